"""DREAM: bitwise equal to diffusers for epsilon; exact rebuild for v, sample and flow (docs/dream.md)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_dream_and_update_latents as upstream_dream

from difftrain.components.dream import compute_dream_and_update_latents, dream_update
from difftrain.components.noise_schedules import build_ddpm, build_flow_match


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0])
def test_epsilon_equals_upstream_bitwise(p):
    unet, scheduler = tiny_unet(), DDPMScheduler()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, ehs = torch.randint(0, 1000, (3,), generator=g), torch.randn(3, 5, 8, generator=g)
    noisy = scheduler.add_noise(x0, noise, t)
    ours = compute_dream_and_update_latents(unet, scheduler, t, noise, noisy, noise.clone(), ehs, p)
    theirs = upstream_dream(unet, scheduler, t, noise, noisy, noise.clone(), ehs, p)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_upstream_rejects_v_prediction_and_we_do_not():
    unet, scheduler = tiny_unet(), DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    noisy, target = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    with pytest.raises(NotImplementedError):
        upstream_dream(unet, scheduler, t, noise, noisy, target, torch.randn(2, 5, 8))
    new_noisy, new_target = compute_dream_and_update_latents(unet, scheduler, t, noise, noisy, target,
                                                             torch.randn(2, 5, 8))
    assert torch.isfinite(new_noisy).all() and not torch.equal(new_target, target)


SCHEDULES = {
    "epsilon": lambda: build_ddpm(prediction_type="epsilon"),
    "v_prediction": lambda: build_ddpm(prediction_type="v_prediction"),
    "sample": lambda: build_ddpm(prediction_type="sample"),
    "flow": lambda: build_flow_match(),
}


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_rebuild_equals_scheduler_formulas_with_rectified_noise(kind):
    """x_t' and target' are exactly x_t and target recomputed from eps' = eps + lambda (eps - eps_hat)."""
    schedule = SCHEDULES[kind]()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(4, 1, 6, 6, generator=g,
                                                                                       dtype=torch.float64)
    idx = torch.tensor([1, 250, 600, 998])
    fake_pred = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    noisy, target = schedule.add_noise(x0, noise, idx), schedule.target(x0, noise, idx)
    p = 0.7
    new_noisy, new_target = dream_update(schedule, lambda x: fake_pred, idx, noise, noisy, target, p)
    eps_hat = schedule.implied_noise(noisy, fake_pred, idx)
    lam = (schedule.dream_scale(idx) ** p).double().view(-1, 1, 1, 1)
    eps_prime = noise + lam * (noise - eps_hat)
    torch.testing.assert_close(new_noisy, schedule.add_noise(x0, eps_prime, idx), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_target, schedule.target(x0, eps_prime, idx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_perfect_prediction_leaves_inputs_unchanged(kind):
    schedule = SCHEDULES[kind]()
    x0, noise = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    idx = torch.tensor([5, 500, 900])
    noisy, target = schedule.add_noise(x0, noise, idx), schedule.target(x0, noise, idx)
    new_noisy, new_target = dream_update(schedule, lambda x: target, idx, noise, noisy, target, 1.0)
    torch.testing.assert_close(new_noisy, noisy)
    torch.testing.assert_close(new_target, target)


def test_flow_matching_scheduler_through_upstream_signature():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unet = tiny_unet()
    idx = torch.tensor([0, 300, 999])
    t = scheduler.timesteps[idx]
    sigma = scheduler.sigmas[idx].view(-1, 1, 1, 1)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    new_noisy, new_target = compute_dream_and_update_latents(unet, scheduler, t, noise, noisy, target,
                                                             torch.randn(3, 5, 8))
    delta = new_target - target  # flow: target moves by delta, input by sigma * delta
    torch.testing.assert_close(new_noisy - noisy, sigma * delta)
