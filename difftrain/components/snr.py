"""Signal-to-noise ratio and Min-SNR-gamma loss weights.

`compute_snr` returns exactly what `diffusers.training_utils.compute_snr` returns (same float32 operations, so
the results are bitwise equal), but the square roots of ``alphas_cumprod`` are computed and moved to the
timesteps' device once per (scheduler, device) instead of on every call.

`min_snr_weight` is the per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) for the
four training targets, written so that no timestep gives NaN or inf, including SNR = 0 at the last step of a
zero-terminal-SNR schedule.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["MIN_SNR_PREDICTION_TYPES", "compute_snr", "min_snr_weight"]

#: Prediction types accepted by `min_snr_weight`.
MIN_SNR_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# scheduler -> {device: (source alphas_cumprod, its _version, sqrt(a), sqrt(1 - a))}. Weak keys: a scheduler
# that is garbage collected drops its entries. The source tensor is kept to detect reassignment (DDPM's
# `add_noise` replaces `alphas_cumprod` with a copy on the sample's device) and `_version` to detect in-place edits.
_SQRT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _alphas_cumprod(noise_scheduler) -> torch.Tensor:
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"compute_snr needs a scheduler with `alphas_cumprod` (DDPM/DDIM/Euler/... family); "
            f"{type(noise_scheduler).__name__} has none. Flow-matching schedulers have no discrete alphas: use "
            "`min_snr_weight(None, gamma, 'flow', sigmas=sigmas)` for Min-SNR weighting on sigmas."
        )
    if not isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
    return alphas_cumprod


def _sqrt_alphas(noise_scheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    alphas_cumprod = _alphas_cumprod(noise_scheduler)
    try:
        per_device = _SQRT_CACHE.setdefault(noise_scheduler, {})
    except TypeError:  # not weak-referenceable: compute without caching
        per_device = {}
    entry = per_device.get(device)
    if entry is not None and entry[0] is alphas_cumprod and entry[1] == alphas_cumprod._version:
        return entry[2], entry[3]
    # Same operations, on the same device, in the same order as upstream: the roots are taken where
    # `alphas_cumprod` lives, then moved; `.float()` commutes with the later indexing.
    sqrt_alphas = (alphas_cumprod**0.5).to(device=device).float()
    sqrt_one_minus = ((1.0 - alphas_cumprod) ** 0.5).to(device=device).float()
    per_device[device] = (alphas_cumprod, alphas_cumprod._version, sqrt_alphas, sqrt_one_minus)
    return sqrt_alphas, sqrt_one_minus


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]) for integer ``timesteps``, as float32.

    Computed as ``(sqrt(a)[t] / sqrt(1 - a)[t]) ** 2``, exactly like diffusers, on ``timesteps.device`` and with
    ``timesteps.shape``. Raises ValueError when the scheduler has no ``alphas_cumprod`` (flow matching).
    """
    sqrt_alphas, sqrt_one_minus = _sqrt_alphas(noise_scheduler, timesteps.device)
    alpha = sqrt_alphas[timesteps]
    sigma = sqrt_one_minus[timesteps]
    return (alpha / sigma) ** 2


def _check_gamma(gamma) -> float:
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"Min-SNR gamma must be a positive number, got {gamma!r}") from None
    if not value > 0 or value == float("inf"):  # `not >` also rejects NaN
        raise ValueError(f"Min-SNR gamma must be a positive finite number, got {gamma!r}")
    return value


def min_snr_weight(
    snr: torch.Tensor | None,
    gamma: float,
    prediction_type: str,
    *,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample.

    ==============  ===========================  ==========================================
    prediction      weight                       computed as (never NaN/inf)
    ==============  ===========================  ==========================================
    epsilon         min(snr, g) / snr            g / max(snr, g)   (1 for snr <= g, also 0)
    v_prediction    min(snr, g) / (snr + 1)      min(snr, g) / (snr + 1)
    sample          min(snr, g)                  min(snr, g)
    flow            min(snr, g) * sigma^2,       min((1 - sigma)^2, g * sigma^2)
                    snr = ((1 - sigma)/sigma)^2
    ==============  ===========================  ==========================================

    ``g / max(snr, g)`` equals ``min(snr, g) / snr`` bit for bit wherever the latter is defined
    (``x / x == 1`` exactly), and gives the limit 1 at snr = 0 instead of 0/0 = NaN.

    For ``"flow"`` (rectified flow, velocity target ``noise - x0`` with ``x_t = (1 - sigma) x0 + sigma noise``)
    pass ``sigmas`` (same shape as the loss, in [0, 1]); ``snr`` is ignored and may be None. The x0 error is
    ``sigma`` times the velocity error, so ``min(snr, g) * sigma^2`` is the Min-SNR x0 weight carried over.

    Raises ValueError for ``gamma <= 0`` (or non-finite), for an unknown ``prediction_type`` and for missing
    ``snr`` / ``sigmas``.
    """
    gamma = _check_gamma(gamma)
    if prediction_type == "flow":
        if sigmas is None:
            raise ValueError("min_snr_weight(prediction_type='flow') needs `sigmas=`")
        return torch.minimum((1.0 - sigmas) ** 2, gamma * sigmas**2)
    if prediction_type not in MIN_SNR_PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r} for Min-SNR weighting; expected one of "
            f"{', '.join(MIN_SNR_PREDICTION_TYPES)}"
        )
    if snr is None:
        raise ValueError(f"min_snr_weight(prediction_type={prediction_type!r}) needs `snr`")
    if prediction_type == "epsilon":
        # tensor / tensor: torch computes `scalar / tensor` as `reciprocal(tensor) * scalar`, which rounds twice
        return torch.full_like(snr, gamma) / snr.clamp(min=gamma)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # "sample"
