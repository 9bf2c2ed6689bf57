"""Drop-in replacement for `diffusers.training_utils` (image-training surface).

Code written against diffusers runs after changing only the import:

    from difftrain.training_utils import EMAModel, compute_snr, set_seed
"""

from difftrain.components.dream import compute_dream_and_update_latents
from difftrain.components.ema import EMAModel
from difftrain.components.interpolation import resolve_interpolation_mode
from difftrain.components.lora import (
    _set_state_dict_into_text_encoder,
    cast_training_params,
    set_state_dict_into_text_encoder,
    unet_lora_state_dict,
)
from difftrain.components.seeding import set_seed
from difftrain.components.snr import compute_snr, min_snr_weight
from difftrain.components.timesteps import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

__all__ = [
    "EMAModel",
    "_set_state_dict_into_text_encoder",
    "cast_training_params",
    "compute_density_for_timestep_sampling",
    "compute_dream_and_update_latents",
    "compute_loss_weighting_for_sd3",
    "compute_snr",
    "min_snr_weight",
    "resolve_interpolation_mode",
    "set_seed",
    "set_state_dict_into_text_encoder",
    "unet_lora_state_dict",
]
