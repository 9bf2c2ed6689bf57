import math

import pytest
import torch

from difftrain.components import timesteps as ts
from difftrain.components.timesteps import (
    DENSITY_SCHEMES,
    MODE_SCALE_MAX,
    MODE_SCALE_MIN,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    timestep_indices,
)

U_MAX = 1.0 - 2.0**-24  # largest float32 below 1


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fake_rand(values):
    def fake(*args, **kwargs):
        return torch.tensor(values, dtype=torch.float32)

    return fake


def test_mode_scale_max_constant():
    assert MODE_SCALE_MAX == pytest.approx(1.7519, abs=1e-4)
    assert MODE_SCALE_MAX == pytest.approx(1 / (math.pi / 2 - 1))
    assert MODE_SCALE_MIN == -1.0


def test_mode_anchors_with_mocked_draws(monkeypatch):
    monkeypatch.setattr(ts.torch, "rand", _fake_rand([0.0, 0.25, 0.5, 0.75, 1.0]))
    u = compute_density_for_timestep_sampling("mode", 5, mode_scale=1.29)
    torch.testing.assert_close(u, torch.tensor([U_MAX, 0.6164, 0.5, 0.3836, 0.0]), atol=1e-4, rtol=0)
    assert u[0].item() == U_MAX  # f(0) = 1 clamped to the largest float below 1


def test_mode_zero_draw_gives_last_valid_index(monkeypatch):
    monkeypatch.setattr(ts.torch, "rand", _fake_rand([0.0, 0.0]))
    u = compute_density_for_timestep_sampling("mode", 2, mode_scale=1.29)
    assert bool((u < 1).all())
    for n in (1, 7, 1000, 1024, 4096, 2**24):
        assert bool(((u * n).long() < n).all()), n
        assert timestep_indices(u, n).tolist() == [n - 1, n - 1]


def test_mode_scale_zero_is_identity_one_minus_u(monkeypatch):
    monkeypatch.setattr(ts.torch, "rand", _fake_rand([0.1, 0.6]))
    u = compute_density_for_timestep_sampling("mode", 2, mode_scale=0.0)
    torch.testing.assert_close(u, torch.tensor([0.9, 0.4]))


def test_logit_normal_saturation_is_clamped():
    u = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=30.0, logit_std=1.0, generator=_gen()
    )
    assert bool((u < 1).all())
    assert timestep_indices(u, 1000).tolist() == [999] * 64


@pytest.mark.parametrize("scale", [MODE_SCALE_MAX + 1e-3, MODE_SCALE_MIN - 1e-3, 10.0, float("nan")])
def test_mode_scale_out_of_range_rejected(scale):
    with pytest.raises(ValueError, match="mode_scale"):
        compute_density_for_timestep_sampling("mode", 4, mode_scale=scale)


@pytest.mark.parametrize("scale", [MODE_SCALE_MIN, 0.0, 1.29, MODE_SCALE_MAX])
def test_mode_in_range_stays_in_unit_interval_and_is_monotone(scale, monkeypatch):
    u = compute_density_for_timestep_sampling("mode", 4096, mode_scale=scale, generator=_gen())
    assert bool((u >= 0).all()) and bool((u < 1).all())
    grid = torch.linspace(0, 1, 1001)
    monkeypatch.setattr(ts.torch, "rand", lambda *a, **k: grid.clone())
    mapped = compute_density_for_timestep_sampling("mode", 1001, mode_scale=scale)
    assert bool((mapped[1:] <= mapped[:-1] + 1e-6).all())


def test_positive_logit_mean_raises_mean_u():
    kwargs = {"logit_std": 1.0, "generator": _gen(123)}
    up = compute_density_for_timestep_sampling("logit_normal", 10_000, logit_mean=1.0, **kwargs).mean()
    centre = compute_density_for_timestep_sampling("logit_normal", 10_000, logit_mean=0.0, **kwargs).mean()
    down = compute_density_for_timestep_sampling("logit_normal", 10_000, logit_mean=-1.0, **kwargs).mean()
    assert centre.item() == pytest.approx(0.5, abs=0.01)
    assert up.item() > 0.65  # E[sigmoid(N(1, 1))] = 0.70
    assert down.item() < 0.35


@pytest.mark.parametrize("scheme", ["uniform", "none", "sigma_sqrt", "cosmap"])
def test_uniform_schemes_draw_torch_rand(scheme):
    u = compute_density_for_timestep_sampling(scheme, 8, generator=_gen(5))
    assert torch.equal(u, torch.rand(8, generator=_gen(5)))


def test_same_generator_seed_same_draws():
    a = compute_density_for_timestep_sampling("logit_normal", 16, 0.0, 1.0, generator=_gen(9))
    b = compute_density_for_timestep_sampling("logit_normal", 16, 0.0, 1.0, generator=_gen(9))
    assert torch.equal(a, b)
    assert a.device == torch.device("cpu") and a.dtype == torch.float32


def test_density_validation():
    with pytest.raises(ValueError, match="logit-normal"):
        compute_density_for_timestep_sampling("logit-normal", 4)
    with pytest.raises(ValueError, match="logit_mean"):
        compute_density_for_timestep_sampling("logit_normal", 4)
    with pytest.raises(ValueError, match="logit_std"):
        compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0, logit_std=-1.0)
    with pytest.raises(ValueError, match="mode_scale"):
        compute_density_for_timestep_sampling("mode", 4)
    assert set(DENSITY_SCHEMES) == {"uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap"}


def test_timestep_indices_clamps_and_is_long():
    u = torch.tensor([-0.5, 0.0, 0.0005, 0.5, 0.9999, 1.0, 3.0])
    idx = timestep_indices(u, 1000)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [0, 0, 0, 500, 999, 999, 999]
    with pytest.raises(ValueError):
        timestep_indices(u, 0)


def test_cosmap_anchors():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    weight = compute_loss_weighting_for_sd3("cosmap", sigmas)
    torch.testing.assert_close(
        weight, torch.tensor([0.63662, 1.01859, 1.27324, 1.01859, 0.63662]), atol=1e-5, rtol=0
    )


def test_sigma_sqrt_is_inverse_square_as_float32():
    sigmas = torch.tensor([0.003, 0.5, 1.0], dtype=torch.bfloat16)
    weight = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, (sigmas.float() ** -2), rtol=1e-2, atol=0)
    assert weight[0].item() > 1e5


@pytest.mark.parametrize("scheme", ["none", "uniform", "logit_normal", "mode"])
def test_other_schemes_weight_one(scheme):
    sigmas = torch.rand(6, generator=_gen())
    assert torch.equal(compute_loss_weighting_for_sd3(scheme, sigmas), torch.ones(6))


def test_max_weight_clamps_and_default_does_not():
    sigmas = torch.tensor([0.0, 0.01, 0.5])
    raw = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas)
    assert math.isinf(raw[0].item())
    clamped = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas, max_weight=100.0)
    assert clamped.tolist() == [100.0, 100.0, pytest.approx(4.0)]
    cosmap = compute_loss_weighting_for_sd3("cosmap", sigmas, max_weight=1.0)
    assert float(cosmap.max()) <= 1.0


def test_loss_weighting_validation():
    with pytest.raises(ValueError, match="min_snr_weight"):
        compute_loss_weighting_for_sd3("min_snr", torch.ones(2))
    with pytest.raises(ValueError, match="cosmap"):
        compute_loss_weighting_for_sd3("cosine", torch.ones(2))
    with pytest.raises(ValueError, match="sigmas"):
        compute_loss_weighting_for_sd3("cosmap")
    with pytest.raises(ValueError, match="max_weight"):
        compute_loss_weighting_for_sd3("cosmap", torch.ones(2), max_weight=0.0)
