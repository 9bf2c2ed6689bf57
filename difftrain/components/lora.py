"""LoRA helpers for PEFT-adapted diffusers and transformers models.

Differences from `diffusers.training_utils`:

* `unet_lora_state_dict` reads the PEFT adapter (``get_peft_model_state_dict`` converted to the diffusers key
  format, what every upstream LoRA script does inline). Upstream walks the removed ``LoRACompatible*`` layers and
  returns ``{}`` for a PEFT model; here a model without an adapter raises ValueError.
* `set_state_dict_into_text_encoder` strips the prefix only at the start of each key (upstream uses
  ``str.replace``, which also removes later occurrences), returns the unexpected keys and warns about them
  (upstream ignores PEFT's load result), warns when no key carries the prefix and raises a clear ValueError when
  the text encoder has no adapter.
* `lora_adapter_metadata` (upstream `_collate_lora_metadata`) raises a clear ValueError for a module without
  the adapter instead of an AttributeError/KeyError.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = [
    "_collate_lora_metadata",
    "_set_state_dict_into_text_encoder",
    "cast_training_params",
    "lora_adapter_metadata",
    "set_state_dict_into_text_encoder",
    "unet_lora_state_dict",
]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _require_adapter(model: torch.nn.Module, adapter_name: str, what: str) -> None:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise ValueError(
            f"{what} ({type(model).__name__}) has no PEFT adapter; call `model.add_adapter(LoraConfig(...))` first."
        )
    if adapter_name not in peft_config:
        raise ValueError(
            f"{what} ({type(model).__name__}) has no adapter named {adapter_name!r}; it has {sorted(peft_config)}."
        )


def unet_lora_state_dict(unet: torch.nn.Module, *, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Return the LoRA weights of a PEFT-adapted model in diffusers key format.

    Equivalent to ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``: keys look like
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight`` and the values are the
    adapter's parameters themselves (no copy). Works for any model with ``add_adapter`` (UNet, SD3/Flux
    transformers); torch.compile and DDP wrappers are removed first.

    Raises:
        ValueError: the model has no PEFT adapter named ``adapter_name``, or it holds no LoRA weights.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    model = _unwrap(unet)
    _require_adapter(model, adapter_name, "unet_lora_state_dict: the model")
    peft_state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not peft_state:
        raise ValueError(f"The adapter {adapter_name!r} of {type(model).__name__} holds no weights.")
    return convert_state_dict_to_diffusers(peft_state)


def cast_training_params(model: torch.nn.Module | list[torch.nn.Module], dtype=torch.float32) -> None:
    """Cast the trainable (``requires_grad``) parameters of ``model`` (or of each model in a list) to ``dtype``.

    Frozen parameters are left alone, so call it after freezing the base model and adding the adapter (and again
    after loading a checkpoint into the adapter), before building the optimizer. It reassigns ``param.data``:
    not for FSDP flat parameters or ZeRO-3 partitions.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    for module in models:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.to(dtype)


def set_state_dict_into_text_encoder(
    lora_state_dict: dict[str, torch.Tensor], prefix: str, text_encoder: torch.nn.Module
) -> list[str]:
    """Load the ``prefix``-ed part of a LoRA state dict into the ``"default"`` adapter of ``text_encoder``.

    Keys starting with ``prefix`` (e.g. ``"text_encoder."``) are kept with the prefix removed, converted to PEFT
    format (``convert_state_dict_to_peft(convert_state_dict_to_diffusers(...))``) and loaded with
    ``set_peft_model_state_dict(..., adapter_name="default")``.

    Returns:
        The unexpected keys reported by PEFT (a warning lists them when there are any).

    Raises:
        ValueError: ``text_encoder`` has no ``"default"`` PEFT adapter.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import set_peft_model_state_dict

    _require_adapter(text_encoder, "default", "set_state_dict_into_text_encoder: the text encoder")
    selected = {key[len(prefix) :]: value for key, value in lora_state_dict.items() if key.startswith(prefix)}
    if not selected:
        warnings.warn(
            f"No key of the LoRA state dict starts with {prefix!r}; nothing was loaded into "
            f"{type(text_encoder).__name__}.",
            stacklevel=2,
        )
        return []
    peft_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(selected))
    result = set_peft_model_state_dict(text_encoder, peft_state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        warnings.warn(
            f"Loading adapter weights from the state dict led to unexpected keys not found in the model: "
            f"{unexpected}.",
            stacklevel=2,
        )
    return unexpected


#: Upstream's private name, for drop-in use.
_set_state_dict_into_text_encoder = set_state_dict_into_text_encoder


def lora_adapter_metadata(modules: dict[str, torch.nn.Module | None]) -> dict[str, Any]:
    """Collect ``{f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict()}``, skipping None.

    Pass the result as ``**kwargs`` to ``<Pipeline>.save_lora_weights`` so the LoRA config (rank, alpha, target
    modules, ...) is stored in the safetensors metadata.
    """
    metadata: dict[str, Any] = {}
    for name, module in modules.items():
        if module is None:
            continue
        module = _unwrap(module)
        _require_adapter(module, "default", f"lora_adapter_metadata: {name!r}")
        metadata[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    return metadata


#: Upstream's private name, for drop-in use.
_collate_lora_metadata = lora_adapter_metadata
