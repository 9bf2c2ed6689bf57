"""Presets are config (`defaults: [base]` plus one key): they compose to exactly the expected dicts, take
overrides like any option, and a key that contradicts the option's name is rejected. One spelling for an
absent component: `none`."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from difftrain import registry
from difftrain.cli.train import compose_config, precheck
from difftrain.config.validate import ConfigError, validate

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
        "rescale_betas_zero_snr": False, "clip_sample": True}
EMA = {"decay": 0.9999, "min_decay": 0.0, "update_after_step": 0, "inv_gamma": 1.0, "foreach": True, "offload": False}
ZERO = {"offload_optimizer": "none", "offload_param": "none", "nvme_path": None, "cpu_optimizer": True,
        "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000, "timeout_s": 1800}


@pytest.mark.parametrize("overrides,group,expected", [
    (["scheduler=ddpm_v"], "scheduler", {"name": "ddpm_v", **DDPM, "prediction_type": "v_prediction"}),
    (["scheduler=ddpm_v", "scheduler.beta_end=0.03"], "scheduler",
     {"name": "ddpm_v", **DDPM, "beta_end": 0.03, "prediction_type": "v_prediction"}),
    (["scheduler=ddpm"], "scheduler", {"name": "ddpm", **DDPM, "prediction_type": "epsilon"}),
    (["ema=ema_warmup"], "ema", {"name": "ema_warmup", **EMA, "use_ema_warmup": True, "power": 0.75}),
    (["ema=ema_warmup", "ema.power=0.5"], "ema", {"name": "ema_warmup", **EMA, "use_ema_warmup": True, "power": 0.5}),
    (["ema=ema"], "ema", {"name": "ema", **EMA, "use_ema_warmup": False, "power": 2 / 3}),
    (["distributed=deepspeed_zero3"], "distributed", {"name": "deepspeed_zero3", "zero_stage": 3, **ZERO}),
    (["distributed=deepspeed_zero2"], "distributed", {"name": "deepspeed_zero2", "zero_stage": 2, **ZERO}),
    (["ema=none"], "ema", {"name": "none"}),
    (["dream=none"], "dream", {"name": "none"}),
    (["lora=none"], "lora", {"name": "none"}),
])
def test_presets_compose_and_validate_to_exactly(overrides, group, expected):
    composed = compose_config(overrides)[group]
    assert composed == expected
    assert validate(compose_config(overrides))[group] == expected


def test_absent_components_are_spelled_none_everywhere():
    for group in ("dream", "ema", "lora", "loss_weighting"):
        assert "none" in registry.names(group) and "off" not in registry.names(group)
    cfg = compose_config([])
    assert (cfg["dream"], cfg["lora"], cfg["loss_weighting"]) == ({"name": "none"},) * 3


def test_the_old_spelling_gets_the_options_and_a_hint():
    with pytest.raises(registry.UnknownComponentError) as info:
        registry.get("ema", "off")
    assert str(info.value) == "unknown ema 'off'; registered ema options: none, ema, ema_warmup, posthoc (renamed: use ema=none)"
    with pytest.raises(ConfigError) as info:
        precheck(["lora=off"], multirun=False)
    assert info.value.errors == ["Could not find 'lora/off' Available options in 'lora': none on "
                                 "(renamed: use lora=none)"]


def test_validated_config_keeps_lists_and_the_engine_dict_shape(tmp_path):
    cfg = tiny_config(tmp_path, "scheduler=ddpm_v")
    assert cfg["optimizer"]["betas"] == [0.9, 0.999] and isinstance(cfg["optimizer"]["betas"], list)
    assert cfg["model"]["block_out_channels"] == [8, 16]
    assert cfg["trainer"]["num_workers"] == 0  # read by the DataLoader (data/loader.py)
    assert cfg["lr_scheduler"] == {"name": "cosine", "warmup_steps": 1, "num_cycles": 0.5}
