"""Bad input fails fast and clearly: exit 2, every problem named, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import cli_env, tiny_config

from difftrain.config.validate import ConfigError


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftrain", *args], env=cli_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides,expected", [
    (["ema.decya=0.9"], "ema.decya"),
    (["+trainer.max_stpes=3"], "did you mean 'max_steps'"),
    (["ema.decay=1.5"], "ema.decay=1.5 must be <= 1"),
    (["loss_weighting=min_snr", "loss_weighting.gamma=-1"], "loss_weighting.gamma=-1.0 must be > 0"),
    (["weighting_scheme=mode", "weighting_scheme.mode_scale=3"], "mode_scale=3.0 must be <= 1.75194"),
    (["trainer.batch_size=abc"], "trainer.batch_size must be int, got 'abc'"),
    (["trainer.batch_size=2.5"], "trainer.batch_size must be int"),
    (["scheduler=foo"], "Available options in 'scheduler': ddpm ddpm_v sd3"),
    (["trainer.mixed_precision=fp8"], "must be one of no, bf16, fp16"),
    (["resume=latest"], "does not exist; pass the folder of the run"),
    (["data=imagefolder"], "data.path is required"),
    (["scheduler.rescale_betas_zero_snr=true"], "use scheduler=ddpm_v"),
    (["ema.min_decay=0.99", "ema.decay=0.9"], "ema.min_decay (0.99) must not exceed ema.decay (0.9)"),
    (["lr_scheduler.warmup_steps=99999"], "exceeds trainer.max_steps"),
])
def test_bad_config_exits_2_with_clear_message(tmp_path, overrides, expected):
    start = time.perf_counter()
    result = run_cli("train", f"output_dir={tmp_path / 'run'}", *overrides, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written, not even outputs/
    assert elapsed < 2.0 + 1.0  # < 2 s of work; 1 s of slack for a loaded CI machine


def test_every_error_is_reported_at_once(tmp_path):
    result = run_cli("train", "ema.decay=1.5", "trainer.batch_size=0", "optimizer.lr=-1", cwd=tmp_path)
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    for expected in ("ema.decay=1.5", "trainer.batch_size=0 must be >= 1", "optimizer.lr=-1.0 must be > 0"):
        assert expected in text


def test_multirun_validates_every_job_before_running(tmp_path):
    result = run_cli("train", "-m", "weighting_scheme=uniform,mode", "weighting_scheme.mode_scale=1.9",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "mode_scale=1.9 must be <= 1.75194 (in job: weighting_scheme=mode" in " ".join(result.stderr.split())
    assert list(tmp_path.iterdir()) == []


def test_help_lists_groups_and_options(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("scheduler: ddpm, ddpm_v, sd3", "loss_weighting: cosmap, min_snr, none, sigma_sqrt",
                 "weighting_scheme: logit_normal, mode, uniform", "dream: none, on"):
        assert text in result.stdout


def test_cfg_job_prints_composed_config(tmp_path):
    result = run_cli("train", "--cfg", "job", "scheduler=sd3", "ema.decay=0.999", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: sd3" in result.stdout and "decay: 0.999" in result.stdout


def test_ints_are_accepted_where_floats_are_expected(tmp_path):
    cfg = tiny_config(tmp_path, "ema.min_decay=0", "loss_weighting=min_snr", "loss_weighting.gamma=5")
    assert cfg["ema"]["min_decay"] == 0.0 and isinstance(cfg["ema"]["min_decay"], float)
    assert isinstance(cfg["loss_weighting"]["gamma"], float)


def test_validation_rejects_unknown_model_combination(tmp_path):
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny_config(tmp_path, "model.block_out_channels=[8,16,16]",
                    "model.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
                    "model.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]", "data.resolution=6")


def test_missing_data_folder_is_a_clear_error(tmp_path):
    result = run_cli("train", "data=imagefolder", f"data.path={tmp_path / 'nope'}",
                     f"output_dir={tmp_path / 'run'}", "trainer.progress=false")
    assert result.returncode == 2
    assert "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_import_difftrain_is_light():
    code = ("import sys, difftrain, difftrain.registry, difftrain.config.validate; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_components_lists_every_option():
    from difftrain import registry

    result = run_cli("components")
    assert result.returncode == 0
    for group in registry.groups():
        for name in registry.names(group):
            assert name in result.stdout, (group, name)


def test_resume_without_output_dir_is_rejected(tmp_path):
    result = run_cli("train", "resume=latest", cwd=tmp_path)
    assert result.returncode == 2 and "resume needs output_dir" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tab_completion_offers_groups_options_and_keys(tmp_path):
    import os

    def complete(line: str) -> list[str]:
        env = {**cli_env(), "COMP_LINE": line, "COMP_POINT": str(len(line))}
        result = subprocess.run([sys.executable, "-m", "difftrain", "-sc", "query=bash"], env=env,
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("difftrain train scheduler=") == ["scheduler=ddpm", "scheduler=ddpm_v", "scheduler=sd3"]
    assert "ema.decay=" in complete("difftrain train ema.")
    install = run_cli("train", "--shell-completion", "install=bash", cwd=tmp_path)
    assert install.returncode == 0 and "hydra_bash_completion" in install.stdout
    assert os.listdir(tmp_path) == []
