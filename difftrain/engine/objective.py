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
    element_loss: object | None = None  # components.losses.ElementLoss; None = mse

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

    def loss(self, family, model, x0: torch.Tensor, cond: dict, draw: StepNoise,
             extras: dict | None = None) -> torch.Tensor:
        """The training loss of one micro-batch (`loss_terms` without the logged parts)."""
        return self.loss_terms(family, model, x0, cond, draw, extras)[0]

    def loss_terms(self, family, model, x0: torch.Tensor, cond: dict, draw: StepNoise,
                   extras: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logged terms). The element loss (mse by default, components/losses.py) times the mask weights
        (`extras["mask"]`, downsampled to the latent size by area averaging), averaged per sample, times w(t);
        then the mean over the batch -- or, with DreamBooth class samples (`extras["prior"]`), the mean over the
        instance samples plus the prior-weighted mean over the class samples (diffusers' train_dreambooth
        split: instance loss + prior_loss_weight x prior loss)."""
        prediction, target = self.prediction_and_target(family, model, x0, cond, draw)
        extras = extras or {}
        if self.element_loss is None:
            elements = (prediction - target) ** 2
        else:
            elements = self.element_loss(prediction, target, self.schedule, draw.indices)
        mask = extras.get("mask")
        if mask is not None:
            mask = mask.to(elements.device, torch.float32)
            if mask.shape[-2:] != elements.shape[-2:]:
                mask = torch.nn.functional.adaptive_avg_pool2d(mask, elements.shape[-2:])
            elements = elements * mask
        per_sample = elements.mean(dim=tuple(range(1, prediction.ndim)))
        weights = self.weighting(self.schedule, draw.indices)
        if weights is not None:
            per_sample = per_sample * weights
        prior = extras.get("prior")
        if prior is None or not bool(prior.any()):
            return per_sample.mean(), {}
        prior = prior.to(per_sample.device)
        instance, class_loss = per_sample[~prior].mean(), per_sample[prior]
        prior_weight = extras["prior_weight"].to(per_sample.device)[prior]
        weighted = (class_loss * prior_weight).mean()
        return instance + weighted, {"loss_instance": instance.detach(), "loss_prior": class_loss.mean().detach()}

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


def loss_extras(batch: dict) -> dict:
    """What a batch adds to the loss besides (x0, cond): per-pixel mask weights and DreamBooth's class-sample
    flags. A mask m in [0, 1] (data.masks) weighs a pixel by unmasked_weight + (1 - unmasked_weight) * m."""
    extras: dict = {}
    masks = batch.get("masks")
    if masks is not None:
        m = masks.float() / 255.0
        floor = batch["mask_floor"].float().view(-1, 1, 1, 1)
        extras["mask"] = floor + (1.0 - floor) * m
    if batch.get("prior") is not None:
        extras["prior"], extras["prior_weight"] = batch["prior"], batch["prior_weight"]
    return extras
