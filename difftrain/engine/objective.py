"""The diffusion objective, written once: the draws of a step, noising, the target, DREAM, preconditioning
and the weighted loss. Training and the validation loss both go through `prediction_and_target`, so they
cannot drift apart (k-diffusion's `Denoiser` owning its loss is the model for this).

Every formulation is x_t = a x0 + b eps (components/noise_schedules.py); the model family only says how
its denoiser is called (`family.predict`).

The validation loss is deliberately *unweighted*: the MSE of the same prediction and target as training
(preconditioning included), at fixed, evenly spaced timesteps, on fixed samples and fixed noise, without
DREAM (a training-time change of input and target) and without `loss_weighting`. Runs of a sweep over
`loss_weighting` or `weighting_scheme` are therefore compared on one yardstick, and the number moves only
when the model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.components.noise_schedules import NoiseSchedule


@dataclass(frozen=True)
class StepNoise:
    """The random draws of one micro-batch besides the data: eps, the eps that builds x_t, timestep indices."""

    noise: torch.Tensor
    input_noise: torch.Tensor  # noise + input_perturbation draw (x_t only; the target keeps `noise`)
    indices: torch.Tensor


@dataclass
class DiffusionObjective:
    schedule: NoiseSchedule
    density: object            # components.weighting.TimestepDensity: u in [0, 1)
    weighting: object          # components.weighting.LossWeighting: w(t) per sample, or None
    dream: object | None = None  # components.dream DREAM callable, or None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> StepNoise:
        """Every draw in a fixed order from `generator` (on the CPU, so every device gives the same numbers),
        then moved to x0's device and dtype."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
        input_noise = noise
        if self.input_perturbation:  # perturbs x_t only; the target keeps the clean noise
            input_noise = noise + self.input_perturbation * torch.randn(x0.shape, generator=generator)
        indices = self.schedule.index_from_u(self.density.sample(x0.shape[0], "cpu", generator))

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(x0.device, non_blocking=True)

        return StepNoise(move(noise).to(x0.dtype), move(input_noise).to(x0.dtype), move(indices))

    def prediction_and_target(self, family, model, x0: torch.Tensor, cond: dict, draw: StepNoise,
                              use_dream: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 prediction, target) of one batch: x_t from x0 and the input noise, the schedule's
        target, DREAM's update of both, and SD3 preconditioning (x0 estimate trained against x0)."""
        schedule, indices = self.schedule, draw.indices
        noisy = schedule.add_noise(x0, draw.input_noise, indices)
        target = schedule.target(x0, draw.noise, indices)
        timesteps = schedule.model_timesteps(indices)
        if use_dream and self.dream is not None:
            noisy, target = self.dream(schedule, lambda x: family.predict(model, x, timesteps, cond), indices,
                                       draw.noise, noisy, target)
        prediction = family.predict(model, noisy, timesteps, cond).float()
        if schedule.precondition_outputs:
            prediction, target = schedule.implied_sample(noisy, prediction, indices), x0
        return prediction, target.float()

    def loss(self, family, model, x0: torch.Tensor, cond: dict, draw: StepNoise) -> torch.Tensor:
        """mean over the batch of w(t) * per-sample MSE."""
        prediction, target = self.prediction_and_target(family, model, x0, cond, draw)
        per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
        weights = self.weighting(self.schedule, draw.indices)
        return (per_sample * weights).mean() if weights is not None else per_sample.mean()

    @torch.no_grad()
    def validation_loss(self, family, model, x0: torch.Tensor, cond: dict, num_timesteps: int, seed: int) -> float:
        """Unweighted MSE (module docstring) averaged over `num_timesteps` evenly spaced timesteps."""
        generator = torch.Generator().manual_seed(seed)
        grid = torch.linspace(0, self.schedule.num_train_timesteps - 1, num_timesteps).round().long()
        total = 0.0
        for index in grid:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            draw = StepNoise(noise, noise, index.expand(x0.shape[0]).to(x0.device))
            prediction, target = self.prediction_and_target(family, model, x0, cond, draw, use_dream=False)
            total += torch.mean((prediction - target) ** 2).item()
        return total / num_timesteps
