"""difftrain: train diffusion models from Hydra YAML configs.

`import difftrain` stays light (no torch, no diffusers): the public names of diffusers'
`training_utils` are resolved lazily on first attribute access, so that

    from difftrain import EMAModel, compute_snr

works as a drop-in for `from diffusers.training_utils import ...`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY_EXPORTS = {
    "set_seed": "difftrain.components.seeding",
    "compute_snr": "difftrain.components.snr",
    "min_snr_weight": "difftrain.components.snr",
    "resolve_interpolation_mode": "difftrain.components.interpolation",
    "compute_dream_and_update_latents": "difftrain.components.dream",
    "unet_lora_state_dict": "difftrain.components.lora",
    "cast_training_params": "difftrain.components.lora",
    "_set_state_dict_into_text_encoder": "difftrain.components.lora",
    "set_state_dict_into_text_encoder": "difftrain.components.lora",
    "compute_density_for_timestep_sampling": "difftrain.components.timesteps",
    "compute_loss_weighting_for_sd3": "difftrain.components.timesteps",
    "EMAModel": "difftrain.components.ema",
}

__all__ = sorted(_LAZY_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'difftrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
