"""Timestep sampling densities and loss weights for flow-matching (SD3-style) training.

`compute_density_for_timestep_sampling` draws exactly the same random numbers as
`diffusers.training_utils.compute_density_for_timestep_sampling` for the same generator, with three fixes:

* the result is clamped to ``[0, 1 - eps]`` with ``eps = finfo(u.dtype).eps / 2`` (``2**-24`` for float32, so
  the largest value is the largest float below 1, ``0.99999994``). Upstream can return exactly 1.0 (``mode``
  when ``torch.rand`` returns 0, or a saturating sigmoid in ``logit_normal``), and then
  ``indices = (u * N).long()`` equals ``N``: out of range. With the clamp, ``(u * N).long() < N`` for every
  ``N <= 2**24`` in float32 (``N * (1 - 2**-24)`` rounds below ``N``). Values strictly inside are unchanged.
* ``mode_scale`` must lie in ``[MODE_SCALE_MIN, MODE_SCALE_MAX] = [-1, 2/(pi - 2)]``, the range where the
  mode map is monotone and stays in [0, 1]; outside it raises ValueError (upstream silently leaves [0, 1] and
  negative indices wrap around).
* unknown scheme names raise ValueError (upstream silently samples uniformly, so a typo goes unnoticed). Every
  name the upstream scripts pass is accepted.

`timestep_indices(u, N)` turns ``u`` into indices clamped to ``[0, N - 1]``. `compute_loss_weighting_for_sd3`
is upstream's with an optional ``max_weight`` clamp.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DENSITY_SCHEMES",
    "LOSS_WEIGHTING_SCHEMES",
    "MODE_SCALE_MAX",
    "MODE_SCALE_MIN",
    "compute_density_for_timestep_sampling",
    "compute_loss_weighting_for_sd3",
    "timestep_indices",
]

#: Upper end of the mode_scale range where f_mode is monotone: f'(u) = -1 - s + s*(pi/2)*sin(pi*u) <= 0.
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # 1.7519...
#: Lower end of that range (f'(0) = -1 - s <= 0).
MODE_SCALE_MIN = -1.0

#: Scheme names accepted by `compute_density_for_timestep_sampling`. Besides logit_normal and mode every name
#: samples uniformly (the SD3 scripts pass their single ``--weighting_scheme`` to both functions).
DENSITY_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
#: Scheme names accepted by `compute_loss_weighting_for_sd3`; all but sigma_sqrt and cosmap give weight 1.
LOSS_WEIGHTING_SCHEMES = DENSITY_SCHEMES


def _largest_below_one(dtype: torch.dtype) -> float:
    return 1.0 - torch.finfo(dtype).eps / 2


def compute_density_for_timestep_sampling(
    weighting_scheme: str,
    batch_size: int,
    logit_mean: float | None = None,
    logit_std: float | None = None,
    mode_scale: float | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` values ``u`` in ``[0, 1)`` that pick the training timesteps (SD3 paper, sec. 3.1).

    * ``logit_normal``: ``u = sigmoid(x)``, ``x ~ N(logit_mean, logit_std)``; a positive ``logit_mean`` moves
      ``u`` up (in the diffusers SD3/Flux scripts, whose ``timesteps`` run from high to low noise, a larger
      ``u`` picks a *lower* noise level).
    * ``mode``: ``u0 ~ U[0, 1)``, ``u = 1 - u0 - mode_scale * (cos(pi * u0 / 2)**2 - 1 + u0)``.
    * anything else in `DENSITY_SCHEMES`: ``u ~ U[0, 1)``.

    The draws are those of upstream for the same ``generator``; the result is clamped to
    ``[0, 1 - finfo.eps/2]`` so that ``(u * N).long() < N``.

    Raises:
        ValueError: unknown scheme, missing/invalid ``logit_mean``/``logit_std`` for logit_normal, missing
            ``mode_scale`` or one outside ``[MODE_SCALE_MIN, MODE_SCALE_MAX]`` for mode.
    """
    if weighting_scheme not in DENSITY_SCHEMES:
        raise ValueError(
            f"Unknown timestep weighting_scheme {weighting_scheme!r}; expected one of {', '.join(DENSITY_SCHEMES)}"
        )
    if weighting_scheme == "logit_normal":
        if logit_mean is None or logit_std is None:
            raise ValueError(
                "weighting_scheme='logit_normal' needs logit_mean and logit_std (e.g. 0.0 and 1.0)"
            )
        if not logit_std >= 0:
            raise ValueError(f"logit_std must be >= 0, got {logit_std!r}")
        u = torch.normal(
            mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator
        )
        u = torch.nn.functional.sigmoid(u)
    elif weighting_scheme == "mode":
        if mode_scale is None:
            raise ValueError("weighting_scheme='mode' needs mode_scale (e.g. 1.29)")
        if not MODE_SCALE_MIN <= mode_scale <= MODE_SCALE_MAX:
            raise ValueError(
                f"mode_scale={mode_scale!r} is outside [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.4f}] (= [-1, 2/(pi-2)]), "
                "the range where the mode density maps [0, 1] monotonically onto [0, 1]"
            )
        u = torch.rand(size=(batch_size,), device=device, generator=generator)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch_size,), device=device, generator=generator)
    return u.clamp_(min=0.0, max=_largest_below_one(u.dtype))


def timestep_indices(u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """``(u * num_train_timesteps).long()`` clamped to ``[0, num_train_timesteps - 1]`` (int64)."""
    n = int(num_train_timesteps)
    if n < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    return (u * n).long().clamp_(0, n - 1)


def compute_loss_weighting_for_sd3(
    weighting_scheme: str, sigmas: torch.Tensor | None = None, max_weight: float | None = None
) -> torch.Tensor:
    """Per-sample loss weight for flow-matching training (same formulas as upstream).

    * ``sigma_sqrt``: ``w = sigma**-2`` as float32 (despite the name); unbounded as sigma -> 0 (inf at 0).
    * ``cosmap``: ``w = 2 / (pi * (1 - 2 sigma + 2 sigma**2))``, between 2/pi and 4/pi.
    * any other name in `LOSS_WEIGHTING_SCHEMES`: ``ones_like(sigmas)``.

    Args:
        max_weight: Optional upper clamp applied to the result (default None: no clamp, as upstream). Useful
            with ``sigma_sqrt``, whose weight is ~1e5 at sigma = 0.003 and inf at sigma = 0.

    Raises:
        ValueError: unknown scheme (e.g. ``min_snr``: use `difftrain.components.snr.min_snr_weight`), missing
            ``sigmas``, or ``max_weight <= 0``.
    """
    if weighting_scheme not in LOSS_WEIGHTING_SCHEMES:
        hint = (
            " (for Min-SNR use difftrain.components.snr.min_snr_weight)"
            if weighting_scheme == "min_snr"
            else ""
        )
        raise ValueError(
            f"Unknown loss weighting_scheme {weighting_scheme!r}{hint}; expected one of "
            f"{', '.join(LOSS_WEIGHTING_SCHEMES)}"
        )
    if sigmas is None:
        raise ValueError("compute_loss_weighting_for_sd3 needs `sigmas`")
    if max_weight is not None and not max_weight > 0:
        raise ValueError(f"max_weight must be > 0 or None, got {max_weight!r}")
    if weighting_scheme == "sigma_sqrt":
        weighting = (sigmas**-2.0).float()
    elif weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        weighting = 2 / (math.pi * bot)
    else:
        weighting = torch.ones_like(sigmas)
    if max_weight is not None:
        weighting = weighting.clamp(max=max_weight)
    return weighting
