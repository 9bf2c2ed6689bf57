import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from difftrain.components import snr as snr_module
from difftrain.components.snr import MIN_SNR_PREDICTION_TYPES, compute_snr, min_snr_weight


def _ddpm_linear():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _sd_scaled_linear():
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_compute_snr_anchors_ddpm_linear():
    snr = compute_snr(_ddpm_linear(), torch.tensor([0, 999]))
    assert snr.dtype == torch.float32
    assert snr[0].item() == pytest.approx(9997.3, abs=0.05)  # fp32; the exact value is 9999.0
    assert snr[1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_compute_snr_matches_closed_form_and_keeps_shape():
    scheduler = _sd_scaled_linear()
    t = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    snr = compute_snr(scheduler, t)
    assert snr.shape == t.shape
    a = scheduler.alphas_cumprod.double()[t]
    torch.testing.assert_close(snr.double(), a / (1 - a), rtol=1e-5, atol=0)


def test_compute_snr_is_decreasing_in_t():
    snr = compute_snr(_ddpm_linear(), torch.arange(1000))
    assert bool((snr[1:] < snr[:-1]).all())


def test_compute_snr_caches_per_scheduler_and_device():
    scheduler = _ddpm_linear()
    compute_snr(scheduler, torch.tensor([1]))
    entry = snr_module._SQRT_CACHE[scheduler][torch.device("cpu")]
    compute_snr(scheduler, torch.tensor([2]))
    assert snr_module._SQRT_CACHE[scheduler][torch.device("cpu")] is entry  # no recomputation


def test_compute_snr_cache_follows_changes_to_alphas_cumprod():
    scheduler = _ddpm_linear()
    t = torch.tensor([10])
    before = compute_snr(scheduler, t)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.clone()  # reassignment (as DDPM's add_noise does)
    assert torch.equal(compute_snr(scheduler, t), before)
    scheduler.alphas_cumprod[10] = 0.5  # in-place edit bumps the tensor's version
    assert compute_snr(scheduler, t).item() == pytest.approx(1.0)
    scheduler.alphas_cumprod = _ddpm_linear().alphas_cumprod  # reassignment
    assert torch.equal(compute_snr(scheduler, t), before)


def test_compute_snr_rejects_flow_matching_scheduler():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        compute_snr(FlowMatchEulerDiscreteScheduler(), torch.tensor([1]))


def test_compute_snr_zero_terminal_snr_is_zero_at_last_step():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    assert compute_snr(scheduler, torch.tensor([999])).item() == 0.0


@pytest.mark.parametrize(
    ("t", "snr_expected", "w_eps", "w_v"),
    [(100, 8.454, 0.5914, 0.5289), (500, 0.3819, 1.0, 0.2763)],
)
def test_min_snr_anchors_sd_scaled_linear_gamma5(t, snr_expected, w_eps, w_v):
    snr = compute_snr(_sd_scaled_linear(), torch.tensor([t]))
    assert snr.item() == pytest.approx(snr_expected, abs=1e-3)
    assert min_snr_weight(snr, 5.0, "epsilon").item() == pytest.approx(w_eps, abs=1e-4)
    assert min_snr_weight(snr, 5.0, "v_prediction").item() == pytest.approx(w_v, abs=1e-4)
    assert min_snr_weight(snr, 5.0, "sample").item() == pytest.approx(min(snr_expected, 5.0), abs=1e-3)


def test_min_snr_weight_table_against_closed_form():
    snr = torch.tensor([1e-6, 0.1, 1.0, 4.999, 5.0, 5.001, 50.0, 1e4], dtype=torch.float64)
    gamma = 5.0
    clipped = torch.clamp(snr, max=gamma)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "epsilon"), clipped / snr)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v_prediction"), clipped / (snr + 1))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "sample"), clipped)


def test_min_snr_flow_equals_snr_form_inside_and_is_finite_at_ends():
    sigmas = torch.linspace(0, 1, 101, dtype=torch.float64)
    gamma = 5.0
    weight = min_snr_weight(None, gamma, "flow", sigmas=sigmas)
    assert torch.isfinite(weight).all()
    assert weight[0].item() == 0.0 and weight[-1].item() == 0.0
    inner = sigmas[1:-1]
    snr = ((1 - inner) / inner) ** 2
    torch.testing.assert_close(weight[1:-1], torch.clamp(snr, max=gamma) * inner**2)


def test_min_snr_flow_ignores_snr_argument():
    sigmas = torch.tensor([0.3, 0.7])
    assert torch.equal(
        min_snr_weight(torch.tensor([123.0, 0.0]), 2.0, "flow", sigmas=sigmas),
        min_snr_weight(None, 2.0, "flow", sigmas=sigmas),
    )


@pytest.mark.parametrize("prediction_type", MIN_SNR_PREDICTION_TYPES)
def test_min_snr_no_nan_or_inf_for_any_t_with_zero_terminal_snr(prediction_type):
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    t = torch.arange(scheduler.config.num_train_timesteps)
    snr = compute_snr(scheduler, t)
    sigmas = (t.float() + 0.5) / len(t)
    sigmas[0], sigmas[-1] = 0.0, 1.0
    weight = min_snr_weight(snr, 5.0, prediction_type, sigmas=sigmas)
    assert weight.shape == t.shape
    assert torch.isfinite(weight).all()
    assert (weight >= 0).all()
    if prediction_type == "epsilon":
        assert weight[-1].item() == 1.0  # limit of min(snr, g)/snr as snr -> 0


def test_min_snr_accepts_int_gamma_from_yaml():
    snr = torch.tensor([1.0, 10.0])
    assert torch.equal(min_snr_weight(snr, 5, "epsilon"), min_snr_weight(snr, 5.0, "epsilon"))


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan"), float("inf"), "five", None])
def test_min_snr_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(torch.ones(2), gamma, "epsilon")


def test_min_snr_rejects_unknown_prediction_type_and_names_allowed():
    with pytest.raises(ValueError) as info:
        min_snr_weight(torch.ones(2), 5.0, "x0")
    for name in MIN_SNR_PREDICTION_TYPES:
        assert name in str(info.value)


def test_min_snr_requires_inputs():
    with pytest.raises(ValueError, match="sigmas"):
        min_snr_weight(torch.ones(2), 5.0, "flow")
    with pytest.raises(ValueError, match="snr"):
        min_snr_weight(None, 5.0, "epsilon")


def test_min_snr_epsilon_weight_continuous_at_gamma():
    gamma = 5.0
    below = min_snr_weight(torch.tensor([math.nextafter(gamma, 0)]), gamma, "epsilon")
    above = min_snr_weight(torch.tensor([math.nextafter(gamma, 10)]), gamma, "epsilon")
    assert below.item() == 1.0
    assert above.item() == pytest.approx(1.0, abs=1e-6)
