"""Timestep densities and per-sample loss weightings, as configurable components.

Both are written against the scheduler adapter (difftrain.components.noise_schedules), so each
works on every schedule: a sigma-defined weighting on a DDPM schedule uses the flow-equivalent
sigma b / (a + b); Min-SNR uses the adapter's SNR and prediction type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.components.noise_schedules import NoiseSchedule
from difftrain.components.snr import min_snr_weight
from difftrain.components.timesteps import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)


@dataclass(frozen=True)
class TimestepDensity:
    """Draws u in [0, 1) from the chosen density (uniform, logit_normal, mode)."""

    scheme: str
    logit_mean: float | None = None  # logit_normal only
    logit_std: float | None = None   # logit_normal only
    mode_scale: float | None = None  # mode only

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return compute_density_for_timestep_sampling(
            self.scheme, batch_size, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device=device, generator=generator,
        )


def build_density(options) -> TimestepDensity:
    """Registry target of the `weighting_scheme` group (`options`: its config/schema.py dataclass)."""
    return TimestepDensity(options.name, getattr(options, "logit_mean", None), getattr(options, "logit_std", None),
                           getattr(options, "mode_scale", None))


@dataclass(frozen=True)
class LossWeighting:
    """Per-sample weight w(t) multiplying the per-sample MSE."""

    scheme: str
    gamma: float | None = None
    max_weight: float | None = None

    def __call__(self, schedule: NoiseSchedule, indices: torch.Tensor) -> torch.Tensor | None:
        if self.scheme == "none":
            return None
        if self.scheme == "min_snr":
            # preconditioned SD3 outputs are x0 estimates trained against x0: the 'sample' weight
            kind = "sample" if schedule.precondition_outputs else schedule.prediction_type
            sigmas = schedule.sigma(indices) if kind == "flow" else None
            return min_snr_weight(schedule.snr(indices), self.gamma, kind, sigmas=sigmas)
        weights = compute_loss_weighting_for_sd3(self.scheme, sigmas=schedule.sigma(indices))
        if self.max_weight is not None:
            weights = weights.clamp(max=self.max_weight)
        return weights


def build_loss_weighting(options) -> LossWeighting:
    """Registry target of the `loss_weighting` group (`options`: its config/schema.py dataclass)."""
    return LossWeighting(options.name, getattr(options, "gamma", None), getattr(options, "max_weight", None))
