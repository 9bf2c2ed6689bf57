"""difftrain's components against `diffusers.training_utils` on the same inputs and seeds.

`test_equal_*` assert exact equality where upstream is right; every deliberate difference is a
`test_difference_*` of its own that shows upstream's behaviour next to ours.
"""

import copy
import math
import random

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers import training_utils as upstream
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from difftrain.components import interpolation, lora, seeding, snr, timesteps

from .tiny_models import lora_unet, tiny_text_encoder

U_MAX = 1.0 - 2.0**-24


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- equal


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1])
def test_equal_set_seed_draws(seed):
    def draws():
        return random.random(), np.random.rand(4), torch.randn(4)

    upstream.set_seed(seed)
    expected = draws()
    seeding.set_seed(seed)
    got = draws()
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


SCHEDULERS = {
    "ddpm_linear": {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
    "sd_scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_terminal_snr": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "rescale_betas_zero_snr": True,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_equal_compute_snr(name):
    scheduler = DDPMScheduler(num_train_timesteps=1000, **SCHEDULERS[name])
    for t in (torch.arange(1000), torch.randint(0, 1000, (4, 8), generator=_gen(0))):
        for _ in range(2):  # second call is served from the cache
            assert torch.equal(snr.compute_snr(scheduler, t), upstream.compute_snr(scheduler, t))


def test_equal_min_snr_weights_vs_upstream_script_formula():
    # The scripts' inline Min-SNR (train_text_to_image.py): stack/min, then divide.
    scheduler = DDPMScheduler(num_train_timesteps=1000, **SCHEDULERS["sd_scaled_linear"])
    t = torch.randint(0, 1000, (256,), generator=_gen(1))
    s = upstream.compute_snr(scheduler, t)
    clipped = torch.stack([s, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    assert torch.equal(snr.min_snr_weight(s, 5.0, "epsilon"), clipped / s)
    assert torch.equal(snr.min_snr_weight(s, 5.0, "v_prediction"), clipped / (s + 1))


@pytest.mark.parametrize("name", interpolation.INTERPOLATION_MODES)
def test_equal_resolve_interpolation_mode(name):
    assert interpolation.resolve_interpolation_mode(name) is upstream.resolve_interpolation_mode(name)


def test_equal_resolve_interpolation_mode_error():
    with pytest.raises(ValueError) as theirs:
        upstream.resolve_interpolation_mode("area")
    with pytest.raises(ValueError) as ours:
        interpolation.resolve_interpolation_mode("area")
    assert str(ours.value) == str(theirs.value)


DENSITY_CASES = [
    ("none", {}),
    ("uniform", {}),
    ("sigma_sqrt", {}),
    ("cosmap", {}),
    ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("logit_normal", {"logit_mean": 0.5, "logit_std": 1.3}),
    ("logit_normal", {"logit_mean": -1.0, "logit_std": 0.5}),
    ("mode", {"mode_scale": 1.29}),
    ("mode", {"mode_scale": 0.0}),
    ("mode", {"mode_scale": -1.0}),
    ("mode", {"mode_scale": timesteps.MODE_SCALE_MAX}),
]


@pytest.mark.parametrize(("scheme", "kwargs"), DENSITY_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_compute_density_for_timestep_sampling(scheme, kwargs, seed):
    theirs = upstream.compute_density_for_timestep_sampling(scheme, 4096, generator=_gen(seed), **kwargs)
    ours = timesteps.compute_density_for_timestep_sampling(scheme, 4096, generator=_gen(seed), **kwargs)
    inside = (theirs >= 0) & (theirs < 1)
    assert torch.equal(ours[inside], theirs[inside])
    assert torch.equal(ours, theirs.clamp(0, U_MAX))  # only out-of-range values differ (if any)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none", "logit_normal", "mode"])
def test_equal_compute_loss_weighting_for_sd3(scheme):
    sigmas = torch.cat([torch.linspace(0, 1, 11), torch.rand(64, generator=_gen(3))])
    for s in (sigmas, sigmas.double(), sigmas.view(-1, 1, 1, 1)):
        theirs = upstream.compute_loss_weighting_for_sd3(scheme, s)
        ours = timesteps.compute_loss_weighting_for_sd3(scheme, s)
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)


def test_equal_cast_training_params():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    base[0].requires_grad_(False)
    ours_model, theirs_model = copy.deepcopy(base), copy.deepcopy(base)
    lone_ours, lone_theirs = torch.nn.Linear(2, 2).half(), None
    lone_theirs = copy.deepcopy(lone_ours)
    lora.cast_training_params([ours_model, lone_ours])
    upstream.cast_training_params([theirs_model, lone_theirs])
    pairs = list(zip(ours_model.parameters(), theirs_model.parameters())) + list(
        zip(lone_ours.parameters(), lone_theirs.parameters())
    )
    for a, b in pairs:
        assert a.dtype == b.dtype and a.requires_grad == b.requires_grad
        assert torch.equal(a, b)
    assert [p.dtype for p in ours_model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_equal_lora_adapter_metadata():
    unet = lora_unet()
    assert lora.lora_adapter_metadata({"unet": unet, "te": None}) == upstream._collate_lora_metadata(
        {"unet": unet, "te": None}
    )


# ------------------------------------------------------------------------------------------ differences


def test_difference_density_never_returns_one(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(3))
    theirs = upstream.compute_density_for_timestep_sampling("mode", 3, mode_scale=1.29)
    ours = timesteps.compute_density_for_timestep_sampling("mode", 3, mode_scale=1.29)
    monkeypatch.undo()
    assert theirs.tolist() == [1.0] * 3
    assert ((theirs * 1000).long() == 1000).all()  # out of range for timesteps[indices]
    assert ours.tolist() == [U_MAX] * 3 and ((ours * 1000).long() == 999).all()
    # and a saturating logit-normal
    kwargs = {"logit_mean": 20.0, "logit_std": 1.0}
    theirs = upstream.compute_density_for_timestep_sampling("logit_normal", 8, generator=_gen(0), **kwargs)
    ours = timesteps.compute_density_for_timestep_sampling("logit_normal", 8, generator=_gen(0), **kwargs)
    assert (theirs == 1.0).all() and (ours < 1.0).all()


def test_difference_mode_scale_out_of_range_rejected():
    theirs = upstream.compute_density_for_timestep_sampling("mode", 4096, mode_scale=10.0, generator=_gen(0))
    assert (theirs < 0).any()  # e.g. u0=0.25 -> -0.29: a negative index wraps around silently
    with pytest.raises(ValueError, match="mode_scale"):
        timesteps.compute_density_for_timestep_sampling("mode", 4096, mode_scale=10.0, generator=_gen(0))


def test_difference_unknown_scheme_rejected():
    theirs = upstream.compute_density_for_timestep_sampling("logit-normal", 4, generator=_gen(0))
    assert torch.equal(theirs, torch.rand(4, generator=_gen(0)))  # typo silently means uniform
    with pytest.raises(ValueError):
        timesteps.compute_density_for_timestep_sampling("logit-normal", 4, generator=_gen(0))
    assert torch.equal(upstream.compute_loss_weighting_for_sd3("min_snr", torch.rand(3)), torch.ones(3))
    with pytest.raises(ValueError):
        timesteps.compute_loss_weighting_for_sd3("min_snr", torch.rand(3))


def test_difference_min_snr_epsilon_zero_terminal_snr_is_finite():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    t = torch.arange(1000)
    s = upstream.compute_snr(scheduler, t)
    upstream_style = torch.stack([s, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / s
    assert math.isnan(upstream_style[-1].item())  # 0/0 at the terminal step
    ours = snr.min_snr_weight(s, 5.0, "epsilon")
    assert torch.isfinite(ours).all() and ours[-1].item() == 1.0
    assert torch.equal(ours[:-1], upstream_style[:-1])


def test_difference_compute_snr_flow_matching_raises_value_error():
    with pytest.raises(AttributeError):
        upstream.compute_snr(FlowMatchEulerDiscreteScheduler(), torch.tensor([1]))
    with pytest.raises(ValueError, match="flow"):
        snr.compute_snr(FlowMatchEulerDiscreteScheduler(), torch.tensor([1]))


def test_difference_unet_lora_state_dict_nonempty_with_peft():
    unet = lora_unet()
    assert upstream.unet_lora_state_dict(unet) == {}
    ours = lora.unet_lora_state_dict(unet)
    assert len(ours) == 64 and all(".lora.down." in k or ".lora.up." in k for k in ours)


def test_difference_unet_lora_state_dict_without_adapter_raises():
    torch.manual_seed(0)
    plain = torch.nn.Linear(2, 2)
    assert upstream.unet_lora_state_dict(plain) == {}
    with pytest.raises(ValueError):
        lora.unet_lora_state_dict(plain)


def test_difference_text_encoder_prefix_stripped_only_at_start():
    # upstream strips with str.replace, so every occurrence of the prefix goes, not only the leading one:
    # with prefix "encoder." the key "encoder.encoder.layers.0..." becomes "layers.0..." and nothing loads.
    source, theirs, ours = (tiny_text_encoder() for _ in range(3))
    with torch.no_grad():
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.zero_()
    saved = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    state = {f"encoder.{k}": v for k, v in saved.items()}
    assert all(k.startswith("encoder.encoder.layers.") for k in state)
    upstream._set_state_dict_into_text_encoder(state, "encoder.", theirs)  # silent
    assert lora.set_state_dict_into_text_encoder(state, "encoder.", ours) == []
    expected = {n: p for n, p in source.named_parameters() if "lora_" in n}
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            assert (param == 0).all(), name  # nothing was loaded
    for name, param in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, expected[name]), name


def test_difference_set_seed_deterministic_flag_is_ours_only():
    with pytest.raises(TypeError):
        upstream.set_seed(0, deterministic=True)
    seeding.set_seed(0, deterministic=False)
