"""The `lora` config group: peft LoRA adapters on the denoiser (and the CLIP text encoders), in diffusers' format.

Order (pitfalls 1.5): freeze the base -> cast the frozen base to the weight dtype -> add adapters ->
`cast_training_params(fp32)` -> optimizer; the cast is repeated after every checkpoint load.

The denoiser gets its adapter through diffusers' `add_adapter`. The text encoders get theirs through
`peft.inject_adapter_in_model`: transformers 5's `add_adapter` demands peft >= 0.22, which is not released,
while diffusers' `load_lora_weights` (transformers' `load_adapter`) works with the installed peft, so the
files load everywhere. Saved keys are what each pipeline's loader expects, as the diffusers example scripts
write them: SD 1.x/2.x `unet.…to_q.lora.down.weight` / `text_encoder.text_model.…lora_linear_layer.up.weight`,
SD3 peft keys `transformer.…to_q.lora_A.weight` / `text_encoder.text_model.…q_proj.lora_B.weight`; the adapter
configs (rank, alpha, targets) are in the safetensors metadata (`lora_adapter_metadata`), so
`pipe.load_lora_weights(folder)` restores the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.errors import UserError


@dataclass(frozen=True)
class LoraSpec:
    """The adapters to add (built from the validated `lora` options: their schema holds the defaults)."""

    rank: int
    alpha: float | None  # None = rank (scale 1)
    dropout: float
    init: str
    target_modules: tuple[str, ...] | None  # None = the family default
    train_text_encoder: bool
    text_encoder_target_modules: tuple[str, ...]

    def config(self, targets):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, init_lora_weights="gaussian" if self.init == "gaussian" else True,
                          target_modules=list(targets))


def build_lora(options) -> LoraSpec | None:
    """Registry target of the `lora` group (`options`: config/schema_t2i.py LoraOnConfig or LoraOffConfig)."""
    if options.name == "none":
        return None
    return LoraSpec(options.rank, options.alpha, options.dropout, options.init,
                    tuple(options.target_modules) if options.target_modules else None, options.train_text_encoder,
                    tuple(options.text_encoder_target_modules))


def add_denoiser_adapter(denoiser: torch.nn.Module, spec: LoraSpec, default_targets: tuple[str, ...]) -> None:
    targets = spec.target_modules or default_targets
    try:
        denoiser.add_adapter(spec.config(targets))
    except ValueError as exc:
        raise UserError(f"lora.target_modules {list(targets)} do not fit the {type(denoiser).__name__} "
                        f"({str(exc).splitlines()[0][:200]}); name module suffixes it has, e.g. "
                        f"{list(default_targets)}") from None


def add_text_encoder_adapter(text_encoder: torch.nn.Module, spec: LoraSpec) -> None:
    from peft import inject_adapter_in_model

    targets = spec.text_encoder_target_modules
    try:
        inject_adapter_in_model(spec.config(targets), text_encoder, adapter_name="default")
    except ValueError as exc:
        raise UserError(f"lora.text_encoder_target_modules {list(targets)} do not fit the "
                        f"{type(text_encoder).__name__} ({str(exc).splitlines()[0][:200]})") from None


def denoiser_layers(denoiser: torch.nn.Module, diffusers_keys: bool) -> dict[str, torch.Tensor]:
    """The adapter weights of the denoiser (float32 copies): diffusers' legacy keys (`to_q.lora.down.weight`,
    what the SD 1.x/2.x loaders expect) or peft's (`to_q.lora_A.weight`, what the SD3 loader expects)."""
    from peft.utils import get_peft_model_state_dict

    from difftrain.components.lora import unet_lora_state_dict

    state = unet_lora_state_dict(denoiser) if diffusers_keys else get_peft_model_state_dict(denoiser)
    return {k: v.detach().float().clone() for k, v in state.items()}


def text_encoder_layers(text_encoder: torch.nn.Module, diffusers_keys: bool) -> dict[str, torch.Tensor]:
    """The adapter weights of a CLIP text encoder (float32 copies), keys under `text_model.` as on the Hub."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(text_encoder, adapter_name="default")
    if diffusers_keys:
        state = convert_state_dict_to_diffusers(state)
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."  # transformers 5 flattened CLIP
    return {prefix + k: v.detach().float().clone() for k, v in state.items()}


def adapter_metadata(modules: dict[str, torch.nn.Module]) -> dict:
    """`<name>_lora_adapter_metadata` keyword arguments of `save_lora_weights` (peft configs as dicts)."""
    from difftrain.components.lora import lora_adapter_metadata

    return lora_adapter_metadata(modules)


def save_pipeline_lora(folder, model, pipeline_class, denoiser: str, text_encoders: tuple[str, ...],
                       diffusers_keys: bool) -> None:
    """`pipeline_class.save_lora_weights` of a family's trained adapters: `<denoiser>_lora_layers` (the
    family's T2IModule `model.denoiser`: "unet" or "transformer") and, when they were trained, the layers of
    each of `text_encoders`, with every module's adapter config as metadata."""
    layers = {f"{denoiser}_lora_layers": denoiser_layers(model.denoiser, diffusers_keys)}
    modules = {denoiser: model.denoiser}
    if model.text_encoders is not None:
        for name in text_encoders:
            layers[f"{name}_lora_layers"] = text_encoder_layers(model.text_encoders[name], diffusers_keys)
            modules[name] = model.text_encoders[name]
    pipeline_class.save_lora_weights(str(folder), **layers, **adapter_metadata(modules))
