"""Every scheduler x weighting_scheme x loss_weighting x dream combination trains a few steps."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import tiny_config

from difftrain.config.validate import ConfigError

SCHEDULERS = ["ddpm", "ddpm_v", "sd3"]
DENSITIES = ["uniform", "logit_normal", "mode"]
WEIGHTINGS = ["none", "sigma_sqrt", "cosmap", "min_snr"]
DREAMS = ["off", "on"]


@pytest.mark.parametrize("scheduler,density,weighting,dream",
                         list(itertools.product(SCHEDULERS, DENSITIES, WEIGHTINGS, DREAMS)))
def test_combination_trains(tmp_path, scheduler, density, weighting, dream):
    from difftrain.engine.run import run_training

    cfg = tiny_config(tmp_path / "run", f"scheduler={scheduler}", f"weighting_scheme={density}",
                      f"loss_weighting={weighting}", f"dream={dream}", "trainer.max_steps=2",
                      "trainer.checkpoint_every=0", "ema=off")
    summary = run_training(cfg)
    assert summary["steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


def test_sd3_precondition_outputs_trains(tmp_path):
    from difftrain.engine.run import run_training

    cfg = tiny_config(tmp_path / "run", "scheduler=sd3", "scheduler.precondition_outputs=true",
                      "loss_weighting=min_snr", "dream=on", "trainer.max_steps=2")
    assert run_training(cfg)["steps"] == 2


def test_zero_terminal_snr_with_epsilon_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        tiny_config(tmp_path / "run", "scheduler=ddpm", "scheduler.rescale_betas_zero_snr=true")


def test_zero_terminal_snr_with_v_prediction_and_min_snr_trains(tmp_path):
    from difftrain.engine.run import run_training

    cfg = tiny_config(tmp_path / "run", "scheduler=ddpm_v", "scheduler.rescale_betas_zero_snr=true",
                      "loss_weighting=min_snr", "weighting_scheme=mode", "trainer.max_steps=2")
    assert run_training(cfg)["steps"] == 2


def test_noise_offset_and_input_perturbation_change_the_loss(tmp_path):
    from difftrain.engine.run import run_training

    def first_loss(name, *extra):
        run_training(tiny_config(tmp_path / name, "trainer.max_steps=1", "ema=off", *extra))
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    base = first_loss("base")
    assert first_loss("base2") == base
    assert first_loss("offset", "noise.offset=0.1") != base
    assert first_loss("perturb", "noise.input_perturbation=0.1") != base


def test_outputs_load_with_diffusers(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from difftrain.engine.run import run_training

    run_training(tiny_config(tmp_path / "run"))
    final = tmp_path / "run" / "final"
    unet = UNet2DModel.from_pretrained(final / "unet")
    raw = UNet2DModel.from_pretrained(final / "unet_raw")
    DDPMScheduler.from_pretrained(final / "scheduler")
    x = torch.randn(2, 1, 8, 8)
    out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([1, 2])).sample
    assert out.shape == x.shape
    # the EMA weights are the main weights, different from the raw ones after 4 steps
    assert any(not torch.equal(a, b) for a, b in zip(unet.parameters(), raw.parameters()))
    files = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final/unet/config.json",
            "final/unet/diffusion_pytorch_model.safetensors", "final/scheduler/scheduler_config.json"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert any(f.startswith("samples/step_") and f.endswith(".png") for f in files)
