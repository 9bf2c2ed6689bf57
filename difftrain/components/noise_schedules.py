"""Scheduler adapters: one small interface for every parameterisation.

A training step needs the same five things from any diffusion formulation: map a density draw
u in [0, 1) to a timestep, make the noisy input x_t and the regression target, say how both move
when the noise moves (DREAM), recover the noise a prediction implies (DREAM), and give the
signal-to-noise ratio / flow-equivalent sigma of a timestep (Min-SNR, SD3 loss weightings).

Every schedule here is written as x_t = a(t) * x0 + b(t) * eps, so the weightings, Min-SNR and
DREAM are written once, against this interface, not once per model family.

- `DDPMSchedule`: variance-preserving DDPM (a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)) with
  epsilon, v_prediction or sample targets (diffusers' DDPMScheduler tables).
- `FlowMatchSchedule`: rectified flow as in SD3 (a = 1 - sigma, b = sigma, target eps - x0),
  with diffusers' FlowMatchEulerDiscreteScheduler tables (shift applied).

The flow-equivalent sigma of a DDPM timestep is b / (a + b): dividing x_t by (a + b) turns the VP
interpolation into a rectified-flow one with the same SNR, so sigma-defined weightings
(sigma_sqrt, cosmap) have a precise meaning on DDPM schedules too (docs/components.md).
"""

from __future__ import annotations

import torch


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, 1, ...) to broadcast against `like`, in its dtype."""
    return values.to(like.dtype).reshape(values.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Interface shared by all schedules; indices are LongTensors in [0, num_train_timesteps)."""

    prediction_type: str
    precondition_outputs: bool = False
    num_train_timesteps: int

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler  # the diffusers training scheduler (saved beside the model)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    # -- subclasses provide these three (all (B,) float32 on indices.device) ----------------------
    def coefficients(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with x_t = a * x0 + b * eps."""
        raise NotImplementedError

    def model_timesteps(self, indices: torch.Tensor) -> torch.Tensor:
        """The timestep values the denoiser is conditioned on."""
        raise NotImplementedError

    def snr(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- derived, written once -----------------------------------------------------------------
    def index_from_u(self, u: torch.Tensor) -> torch.Tensor:
        """Density draw u in [0, 1) -> timestep index, clamped into range (upstream can hit N)."""
        n = self.num_train_timesteps
        return (u * n).long().clamp_(0, n - 1)

    def sigma(self, indices: torch.Tensor) -> torch.Tensor:
        """Flow-equivalent sigma in [0, 1]: b / (a + b)."""
        a, b = self.coefficients(indices)
        return b / (a + b)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(indices)
        return _per_sample(a, x0) * x0 + _per_sample(b, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(indices)
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            return _per_sample(a, x0) * noise - _per_sample(b, x0) * x0
        return noise - x0  # flow: velocity d x_t / d sigma

    def noise_coefficients(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d x_t / d eps, d target / d eps): how input and target move when eps moves (DREAM)."""
        a, b = self.coefficients(indices)
        kind = self.prediction_type
        if kind in ("epsilon", "flow"):
            return b, torch.ones_like(b)
        if kind == "v_prediction":
            return b, a
        return b, torch.zeros_like(b)  # sample: the target x0 does not depend on eps

    def implied_noise(self, x_t: torch.Tensor, pred: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The noise eps_hat that a model prediction implies at x_t."""
        a, b = self.coefficients(indices)
        a, b = _per_sample(a, x_t), _per_sample(b, x_t)
        kind = self.prediction_type
        if kind == "epsilon":
            return pred
        if kind == "v_prediction":  # eps = a v + b x_t  (a^2 + b^2 = 1)
            return a * pred + b * x_t
        if kind == "sample":
            return (x_t - a * pred) / b
        return x_t + a * pred  # flow: eps = x_t + (1 - sigma) v

    def implied_sample(self, x_t: torch.Tensor, pred: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The clean sample x0_hat that a model prediction implies at x_t."""
        a, b = self.coefficients(indices)
        a, b = _per_sample(a, x_t), _per_sample(b, x_t)
        kind = self.prediction_type
        if kind == "epsilon":
            return (x_t - b * pred) / a
        if kind == "v_prediction":
            return a * x_t - b * pred
        if kind == "sample":
            return pred
        return x_t - b * pred  # flow: x0 = x_t - sigma v

    def dream_scale(self, indices: torch.Tensor) -> torch.Tensor:
        """The noise level DREAM raises to `detail_preservation`: sqrt(1 - alpha_bar) or sigma."""
        return self.coefficients(indices)[1]


class DDPMSchedule(NoiseSchedule):
    """Variance-preserving DDPM with diffusers' DDPMScheduler tables."""

    def __init__(self, scheduler, prediction_type: str | None = None) -> None:
        super().__init__(scheduler)
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; it is not a DDPM-family scheduler")
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of epsilon, v_prediction, sample"
            )
        self._alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _alpha_bar(self, indices: torch.Tensor) -> torch.Tensor:
        table = self._cache.get(indices.device)
        if table is None:  # one copy per device, not one per step
            table = self._cache[indices.device] = self._alphas_cumprod.to(indices.device)
        return table[indices]

    def coefficients(self, indices):
        alpha_bar = self._alpha_bar(indices)
        # `** 0.5` (not sqrt) mirrors diffusers' add_noise / DREAM bit for bit
        return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5

    def model_timesteps(self, indices):
        return indices

    def snr(self, indices):
        a, b = self.coefficients(indices)
        return (a / b) ** 2  # same expression as compute_snr; inf at alpha_bar = 1 is never sampled


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow (SD3): x_t = (1 - sigma) x0 + sigma eps, target eps - x0."""

    prediction_type = "flow"

    def __init__(self, scheduler) -> None:
        super().__init__(scheduler)
        # diffusers' tables: index 0 = sigma_max (pure noise), shift already applied
        self._sigmas = scheduler.sigmas[: self.num_train_timesteps].to(torch.float32)
        self._timesteps = scheduler.timesteps[: self.num_train_timesteps].to(torch.float32)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device):
        tables = self._cache.get(device)
        if tables is None:
            tables = self._cache[device] = (self._sigmas.to(device), self._timesteps.to(device))
        return tables

    def coefficients(self, indices):
        sigma = self._tables(indices.device)[0][indices]
        return 1.0 - sigma, sigma

    def sigma(self, indices):
        return self._tables(indices.device)[0][indices]

    def model_timesteps(self, indices):
        return self._tables(indices.device)[1][indices]

    def snr(self, indices):
        sigma = self.sigma(indices)
        return ((1.0 - sigma) / sigma) ** 2

    def index_of_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Exact lookup of model timesteps in the table (vectorised; no per-sample host sync)."""
        table = self._tables(timesteps.device)[1]
        match = timesteps.to(torch.float32).reshape(-1, 1) == table.reshape(1, -1)
        if not bool(match.any(dim=1).all()):
            raise ValueError("timesteps not found in the flow-matching scheduler's table")
        return match.float().argmax(dim=1)


def schedule_from_scheduler(scheduler, prediction_type: str | None = None) -> NoiseSchedule:
    """Wrap a diffusers training scheduler in the matching adapter."""
    if hasattr(scheduler, "alphas_cumprod"):
        return DDPMSchedule(scheduler, prediction_type)
    if hasattr(scheduler, "sigmas") and type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchSchedule(scheduler)
    raise ValueError(f"no difftrain schedule adapter for {type(scheduler).__name__}")


def build_ddpm(  # DDPMScheduler's own defaults (component API); the config's are in config/schema.py
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    rescale_betas_zero_snr: bool = False,
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
) -> DDPMSchedule:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )
    return DDPMSchedule(scheduler)


def build_flow_match(num_train_timesteps: int = 1000, shift: float = 3.0) -> FlowMatchSchedule:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift))


def build_schedule(options) -> NoiseSchedule:
    """Registry target of the `scheduler` group (ddpm, ddpm_v, sd3): `options` is its validated schema
    (config/schema.py DDPMSchedulerConfig or FlowMatchSchedulerConfig), the one source of the defaults."""
    if options.name == "sd3":
        schedule = build_flow_match(options.num_train_timesteps, options.shift)
        schedule.precondition_outputs = options.precondition_outputs
        return schedule
    return build_ddpm(options.num_train_timesteps, options.beta_schedule, options.beta_start, options.beta_end,
                      options.rescale_betas_zero_snr, options.prediction_type, options.clip_sample)
