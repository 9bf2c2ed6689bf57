"""DREAM (Diffusion Rectification and Estimation-Adaptive Models, arXiv 2312.00210).

DREAM replaces the noise eps by eps' = eps + lambda * (eps - eps_hat), where eps_hat is the noise
implied by the model's own (no-grad) prediction and lambda = s ** p (s the noise level, p the
`detail_preservation`), then rebuilds the noisy input and the target with the scheduler's own
formulas. Input and target are linear in eps, so the rebuild is

    x_t'    = x_t    + (d x_t / d eps)    * delta
    target' = target + (d target / d eps) * delta,      delta = lambda * (eps - eps_hat)

which for epsilon prediction is exactly diffusers' update (x_t + sqrt(1 - alpha_bar) delta,
target + delta), and extends it to v_prediction, sample prediction and flow matching
(derivation in docs/dream.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difftrain.components.noise_schedules import NoiseSchedule, _per_sample, schedule_from_scheduler


def dream_update(
    schedule: NoiseSchedule,
    predict: Callable[[torch.Tensor], torch.Tensor],
    indices: torch.Tensor,
    noise: torch.Tensor,
    noisy: torch.Tensor,
    target: torch.Tensor,
    detail_preservation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy', target') for one batch. `predict(noisy)` runs the denoiser (called without grad)."""
    with torch.no_grad():
        pred = predict(noisy)
    eps_hat = schedule.implied_noise(noisy, pred.to(noisy.dtype), indices)
    lam = _per_sample(schedule.dream_scale(indices) ** detail_preservation, noisy)
    delta = ((noise - eps_hat) * lam).detach()
    coef_input, coef_target = schedule.noise_coefficients(indices)
    return noisy + _per_sample(coef_input, noisy) * delta, target + _per_sample(coef_target, target) * delta


def _indices_for(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    if hasattr(schedule, "index_of_timesteps"):
        return schedule.index_of_timesteps(timesteps)
    return timesteps.long()


def compute_dream_and_update_latents(
    unet,
    noise_scheduler,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    noisy_latents: torch.Tensor,
    target: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    dream_detail_preservation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers-compatible signature; also handles v_prediction, sample and flow-matching schedulers.

    The model is called as upstream does: `unet(noisy_latents, timesteps, encoder_hidden_states).sample`.
    """
    schedule = schedule_from_scheduler(noise_scheduler)
    indices = _indices_for(schedule, timesteps)

    def predict(x):
        out = unet(x, timesteps, encoder_hidden_states)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out

    return dream_update(schedule, predict, indices, noise, noisy_latents, target, dream_detail_preservation)


class Dream:
    """The `dream=on` component: applies `dream_update` with a fixed detail_preservation."""

    def __init__(self, detail_preservation: float = 1.0) -> None:
        self.detail_preservation = detail_preservation

    def __call__(self, schedule, predict, indices, noise, noisy, target):
        return dream_update(schedule, predict, indices, noise, noisy, target, self.detail_preservation)


def build_dream(options) -> Dream | None:
    """Registry target of the `dream` group (`options`: config/schema.py DreamConfig or DreamOffConfig)."""
    return None if options.name == "none" else Dream(options.detail_preservation)
