"""Inference: the scheduler a training schedule samples with, and the sampling loop over a denoise closure.

Below the model families (they call it for validation grids, evaluation and `difftrain sample`): the loop
only sees `predict(x_t, timesteps)`, the one closure a family builds around its denoiser.
"""

from __future__ import annotations

import torch


def inference_scheduler(schedule, steps: int):
    """DDIM for DDPM-family training schedules, flow-matching Euler for SD3-style ones."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = dict(schedule.scheduler.config)
    if schedule.prediction_type == "flow":
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        config["prediction_type"] = schedule.prediction_type
        sched = DDIMScheduler.from_config(config, set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(predict, schedule, shape: tuple[int, ...], steps: int, seed: int, device) -> torch.Tensor:
    """Generate images in [-1, 1] of `shape` (N, C, H, W); `predict(x_t, timesteps)` runs the model."""
    sched = inference_scheduler(schedule, steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device) * float(getattr(sched, "init_noise_sigma", 1.0))
    scale = getattr(sched, "scale_model_input", lambda sample, t: sample)  # flow matching has none
    for t in sched.timesteps:
        timesteps = t.to(device).expand(shape[0])
        pred = predict(scale(x, t), timesteps)
        x = sched.step(pred.float(), t, x, return_dict=False)[0]
    return x.clamp(-1, 1).float().cpu()
