"""difftrain sample / eval on a finished run, imagefolder data, and their error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import cli_env, tiny_config
from PIL import Image


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from difftrain.engine.run import run_training

    run = tmp_path_factory.mktemp("cmd") / "run"
    run_training(tiny_config(run, "trainer.max_steps=3"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return run


def cli(*args):
    return subprocess.run([sys.executable, "-m", "difftrain", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=180)


def test_sample_writes_a_grid_of_the_requested_labels(finished_run):
    result = cli("sample", str(finished_run), "--labels", "0,1", "--num", "3", "--steps", "2")
    assert result.returncode == 0, result.stderr
    out = finished_run / "samples" / "sample_0-1.png"
    assert out.is_file() and result.stdout.strip().endswith("sample_0-1.png")
    with Image.open(out) as im:  # 3 per row, 2 rows of 8x8 upscaled 8x, padding 2
        assert im.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)


def test_sample_is_deterministic_for_a_seed(finished_run, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        assert cli("sample", str(finished_run), "--labels", "1", "--num", "2", "--steps", "2", "--out",
                   str(path)).returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_eval_reports_accuracy(finished_run):
    result = cli("eval", str(finished_run), "--samples-per-label", "2", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "digits accuracy:" in result.stdout
    data = json.loads((finished_run / "eval.json").read_text())
    assert data["samples"] == 20 and 0.0 <= data["accuracy"] <= 1.0 and len(data["per_label"]) == 10


@pytest.mark.parametrize("args,expected", [
    (["sample", "/nonexistent/run"], "is not a difftrain run folder"),
    (["eval", "/nonexistent/run"], "is not a difftrain run folder"),
])
def test_commands_on_missing_runs_fail_clearly(args, expected):
    result = cli(*args)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_sample_rejects_out_of_range_labels(finished_run):
    result = cli("sample", str(finished_run), "--labels", "0,42")
    assert result.returncode == 2 and "must lie in [0, 10)" in result.stderr


def test_imagefolder_with_class_subfolders_trains(tmp_path):
    from difftrain.engine.run import run_training

    data = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(data / cls / f"{i}.png")
    cfg = tiny_config(tmp_path / "run", "data=imagefolder", f"data.path={data}", "data.resolution=8",
                      "data.random_flip=true", "interpolation=lanczos", "trainer.max_steps=2")
    assert cfg["model"]["in_channels"] == 3 and cfg["model"]["num_class_embeds"] is None
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.data.sources import build_imagefolder

    ds = build_imagefolder("imagefolder", str(data), resolution=8, interpolation=resolve_interpolation_mode("lanczos"))
    assert ds.images.shape == (12, 3, 8, 8) and ds.labels.tolist() == [0] * 6 + [1] * 6
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    summary = run_training(cfg)
    assert summary["steps"] == 2


def test_imagefolder_errors_are_clear(tmp_path):
    from difftrain.data.sources import build_imagefolder
    from difftrain.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        build_imagefolder("imagefolder", str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="could not read image"):
        build_imagefolder("imagefolder", str(tmp_path / "bad"))
