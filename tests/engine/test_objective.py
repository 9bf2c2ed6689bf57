"""Golden tests of the schedule adapters and of the one diffusion objective, against diffusers' schedulers
and hand-written formulas on fixed inputs (no engine, no accelerate)."""

from __future__ import annotations

import math

import pytest
import torch

from difftrain import registry
from difftrain.components.dream import Dream
from difftrain.components.noise_schedules import build_ddpm, build_flow_match
from difftrain.engine.objective import DiffusionObjective, StepNoise


class LinearFamily:
    """A family whose denoiser is a fixed 1x1 convolution of x_t plus a timestep term (cond unused)."""

    def predict(self, model, x_t, timesteps, cond):
        return model(x_t) + 1e-3 * timesteps.float().view(-1, 1, 1, 1)


def _model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(0.7)
        conv.bias.fill_(-0.05)
    return conv


def _batch(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)


def _mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def test_ddpm_adapter_matches_diffusers_add_noise_and_velocity():
    from diffusers import DDPMScheduler

    x0, noise = _batch(4)
    idx = torch.tensor([0, 10, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        ours = build_ddpm(prediction_type=prediction)
        theirs = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
        assert torch.equal(ours.add_noise(x0, noise, idx), theirs.add_noise(x0, noise, idx))
        target = ours.target(x0, noise, idx)
        assert torch.equal(target, noise if prediction == "epsilon" else theirs.get_velocity(x0, noise, idx))


def test_flow_adapter_matches_diffusers_tables_and_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, noise = _batch(4)
    idx = torch.tensor([0, 250, 600, 999])
    ours = build_flow_match(shift=3.0)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.equal(ours.sigma(idx), theirs.sigmas[idx].float())
    assert torch.equal(ours.model_timesteps(idx), theirs.timesteps[idx].float())
    expected = theirs.scale_noise(x0, theirs.timesteps[idx], noise)
    torch.testing.assert_close(ours.add_noise(x0, noise, idx), expected, rtol=0, atol=1e-6)
    assert torch.equal(ours.target(x0, noise, idx), noise - x0)
    # shift 3 moves sigma up: sigma = 3 s / (1 + 2 s) of the unshifted s = 1 - idx / 1000
    s = 1 - idx.double() / 1000
    torch.testing.assert_close(ours.sigma(idx).double(), 3 * s / (1 + 2 * s), rtol=0, atol=1e-6)


def _objective(schedule, weighting="none", dream=None, **weights):
    return DiffusionObjective(schedule, registry.build("weighting_scheme", {"name": "uniform"}),
                              registry.build("loss_weighting", {"name": weighting, **weights}), dream)


def test_epsilon_min_snr_loss_by_hand():
    model, family = _model(), LinearFamily()
    x0, noise = _batch()
    idx = torch.tensor([10, 500, 990])
    schedule = build_ddpm()
    objective = _objective(schedule, "min_snr", gamma=5.0)
    loss = objective.loss(family, model, x0, {}, StepNoise(noise, noise, idx))

    alpha_bar = schedule.scheduler.alphas_cumprod[idx].float()
    a, b = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + b * noise
    per_sample = _mse(model(x_t) + 1e-3 * idx.float().view(-1, 1, 1, 1), noise)
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(loss, (per_sample * weights).mean(), rtol=1e-6, atol=0)
    assert weights[0] < 0.02 and weights[2] == 1.0  # Min-SNR cuts the low-noise end only


def test_v_prediction_min_snr_weight_is_snr_plus_one():
    model, family = _model(), LinearFamily()
    x0, noise = _batch()
    idx = torch.tensor([5, 300, 900])
    schedule = build_ddpm(prediction_type="v_prediction")
    loss = _objective(schedule, "min_snr", gamma=5.0).loss(family, model, x0, {}, StepNoise(noise, noise, idx))
    alpha_bar = schedule.scheduler.alphas_cumprod[idx].float()
    a, b = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + b * noise
    per_sample = _mse(model(x_t) + 1e-3 * idx.float().view(-1, 1, 1, 1), a * noise - b * x0)
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(loss, (per_sample * torch.clamp(snr, max=5.0) / (snr + 1)).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_flow_sd3_weightings_by_hand(weighting):
    model, family = _model(), LinearFamily()
    x0, noise = _batch()
    idx = torch.tensor([100, 400, 800])
    schedule = build_flow_match(shift=3.0)
    loss = _objective(schedule, weighting).loss(family, model, x0, {}, StepNoise(noise, noise, idx))
    sigma = schedule.scheduler.sigmas[idx].float()
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    per_sample = _mse(model(x_t) + 1e-3 * schedule.scheduler.timesteps[idx].float().view(-1, 1, 1, 1), noise - x0)
    weights = sigma**-2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(loss, (per_sample * weights).mean(), rtol=1e-6, atol=0)


def test_preconditioned_flow_trains_the_x0_estimate_and_validation_uses_it_too():
    model, family = _model(), LinearFamily()
    x0, noise = _batch()
    idx = torch.tensor([100, 400, 800])
    schedule = build_flow_match(shift=3.0)
    schedule.precondition_outputs = True
    objective = _objective(schedule)
    sigma = schedule.scheduler.sigmas[idx].float().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    velocity = model(x_t) + 1e-3 * schedule.scheduler.timesteps[idx].float().view(-1, 1, 1, 1)
    expected = _mse(x_t - sigma * velocity, x0)
    loss = objective.loss(family, model, x0, {}, StepNoise(noise, noise, idx))
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-6, atol=0)
    prediction, target = objective.prediction_and_target(family, model, x0, {}, StepNoise(noise, noise, idx))
    assert torch.equal(target, x0)  # the validation loss goes through the same pair (it once did not)


def test_validation_loss_is_unweighted_fixed_grid_of_the_training_pair():
    model, family = _model(), LinearFamily()
    x0, _ = _batch(2)
    schedule = build_ddpm()
    objective = _objective(schedule, "min_snr", gamma=1.0, dream=None)
    value = objective.validation_loss(family, model, x0, {}, num_timesteps=3, seed=7)
    g = torch.Generator().manual_seed(7)
    expected = 0.0
    for index in (0, 500, 999):  # linspace(0, 999, 3).round()
        noise = torch.randn(x0.shape, generator=g)
        idx = torch.full((2,), index)
        ab = schedule.scheduler.alphas_cumprod[idx].float().view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        expected += ((model(x_t) + 1e-3 * index - noise) ** 2).mean().item()
    assert value == pytest.approx(expected / 3, rel=1e-6)
    with_dream = DiffusionObjective(schedule, objective.density, objective.weighting, Dream(1.0))
    assert with_dream.validation_loss(family, model, x0, {}, 3, 7) == value  # DREAM is training-only


def test_dream_in_the_objective_by_hand():
    model, family = _model(), LinearFamily()
    x0, noise = _batch()
    idx = torch.tensor([50, 500, 950])
    schedule = build_ddpm()
    loss = _objective(schedule, dream=Dream(1.0)).loss(family, model, x0, {}, StepNoise(noise, noise, idx))
    ab = schedule.scheduler.alphas_cumprod[idx].float().view(-1, 1, 1, 1)
    a, b = ab**0.5, (1 - ab) ** 0.5
    t = 1e-3 * idx.float().view(-1, 1, 1, 1)
    x_t = a * x0 + b * noise
    delta = (noise - (model(x_t) + t)) * b  # epsilon: eps_hat = prediction; lambda = b ** 1
    x_dream, target = x_t + b * delta, noise + delta
    torch.testing.assert_close(loss, _mse(model(x_dream) + t, target).mean(), rtol=1e-5, atol=0)


def test_draws_come_in_a_fixed_order_from_the_step_generator():
    schedule = build_ddpm()
    objective = DiffusionObjective(schedule, registry.build("weighting_scheme", {"name": "logit_normal"}),
                                   registry.build("loss_weighting", {"name": "none"}),
                                   noise_offset=0.1, input_perturbation=0.2)
    x0 = torch.zeros(3, 2, 4, 4)
    draw = objective.draw(x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    noise = noise + 0.1 * torch.randn((3, 2, 1, 1), generator=g)
    perturbed = noise + 0.2 * torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(torch.randn(3, generator=g))
    assert torch.equal(draw.noise, noise) and torch.equal(draw.input_noise, perturbed)
    assert torch.equal(draw.indices, (u * 1000).long().clamp(0, 999))


def _reference_loss(scheduler_name, weighting, dream, model, x0, noise, idx):
    """The same loss written independently: diffusers' schedulers, diffusers' compute_snr and
    compute_loss_weighting_for_sd3, the Min-SNR rules of the papers, DREAM's update written out."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

    view = (-1, 1, 1, 1)
    if scheduler_name == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sigma = sched.sigmas[idx].float()
        timesteps = sched.timesteps[idx].float()
        a, b, kind = 1 - sigma, sigma, "flow"
        snr = ((1 - sigma) / sigma) ** 2
    else:
        kind = "epsilon" if scheduler_name == "ddpm" else "v_prediction"
        sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
        ab = sched.alphas_cumprod[idx].float()
        a, b, timesteps, snr = ab**0.5, (1 - ab) ** 0.5, idx, compute_snr(sched, idx)
        sigma = b / (a + b)
    a4, b4 = a.view(view), b.view(view)

    def target_of(eps):
        return {"epsilon": eps, "v_prediction": a4 * eps - b4 * x0, "flow": eps - x0}[kind]

    def predict(x):
        return model(x) + 1e-3 * timesteps.float().view(view)

    x_t, target = a4 * x0 + b4 * noise, target_of(noise)
    if dream:
        with torch.no_grad():
            p = predict(x_t)
        eps_hat = {"epsilon": p, "v_prediction": a4 * p + b4 * x_t, "flow": x_t + a4 * p}[kind]
        delta = (noise - eps_hat) * b4  # lambda = b ** detail_preservation (1.0)
        x_t, target = x_t + b4 * delta, target_of(noise + delta)  # target is linear in eps
    per_sample = _mse(predict(x_t), target)
    if weighting == "none":
        weights = torch.ones_like(per_sample)
    elif weighting == "min_snr":
        gamma = torch.full_like(snr, 5.0)
        clipped = torch.minimum(snr, gamma)
        weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "flow": clipped * sigma**2}[kind]
    else:
        weights = compute_loss_weighting_for_sd3(weighting, sigma)
    return (per_sample * weights).mean()


@pytest.mark.parametrize("dream", [False, True])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap", "min_snr"])
@pytest.mark.parametrize("scheduler_name", ["ddpm", "ddpm_v", "sd3"])
def test_every_scheduler_weighting_dream_combination_against_reference(scheduler_name, weighting, dream):
    schedule = registry.build("scheduler", {"name": scheduler_name, **(
        {"prediction_type": "v_prediction"} if scheduler_name == "ddpm_v" else {})})
    options = {"gamma": 5.0} if weighting == "min_snr" else {}
    objective = _objective(schedule, weighting, dream=Dream(1.0) if dream else None, **options)
    model, family = _model(), LinearFamily()
    x0, noise = _batch(4)
    idx = torch.tensor([20, 333, 666, 980])
    ours = objective.loss(family, model, x0, {}, StepNoise(noise, noise, idx))
    expected = _reference_loss(scheduler_name, weighting, dream, model, x0, noise, idx)
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=0)
