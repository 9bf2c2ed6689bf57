"""difftrain sample / eval on a finished run, imagefolder data, and their error paths."""

from __future__ import annotations

import json
import logging
import os
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
    """`difftrain ARGS` in a fresh process: real exit codes, and what a user's terminal would show."""
    return subprocess.run([sys.executable, "-m", "difftrain", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def main_cli(capsys):
    """`difftrain ARGS` in this process (`difftrain.cli.main.main`, what `python -m difftrain` calls), as a
    CompletedProcess: the commands' behaviour without paying for a fresh interpreter's imports each time."""
    from difftrain.cli.main import main

    def process_state():
        return os.getcwd(), torch.get_default_dtype(), list(logging.getLogger().handlers)

    def call(*args):
        capsys.readouterr()
        before = process_state()
        code = main([str(a) for a in args])
        assert process_state() == before, "the command changed process-wide state (cwd, dtype, log handlers)"
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["difftrain", *args], code, out, err)

    return call


def test_sample_writes_a_grid_of_the_requested_labels(finished_run, main_cli, tmp_path):
    result = main_cli("sample", finished_run, "--labels", "0,1", "--num", "3", "--steps", "2")
    assert result.returncode == 0, result.stderr
    out = finished_run / "samples" / "sample_0-1.png"
    assert out.is_file() and result.stdout.strip() == str(out)
    with Image.open(out) as im:  # 3 per row, 2 rows of 8x8 upscaled 8x, padding 2
        assert im.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    # --out writes the same grid elsewhere (and says where)
    again = main_cli("sample", finished_run, "--labels", "0,1", "--num", "3", "--steps", "2", "--out",
                     tmp_path / "grid.png")
    assert again.returncode == 0 and again.stdout.strip() == str(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes() == out.read_bytes()


def test_sample_is_deterministic_for_a_seed(finished_run, main_cli, tmp_path):
    """The same seed gives the same bytes twice in one process (so no draw comes from a global RNG, whose
    state the first call moved on) and in a fresh `python -m difftrain` process; another seed, another grid."""
    args = ["sample", finished_run, "--labels", "1", "--num", "2", "--steps", "2", "--out"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main_cli(*args, tmp_path / f"{name}.png", "--seed", seed).returncode == 0
    fresh = cli(*map(str, args), str(tmp_path / "fresh.png"), "--seed", "0")  # the one real sample subprocess
    assert fresh.returncode == 0 and fresh.stdout.strip() == str(tmp_path / "fresh.png"), fresh.stderr
    a, b, c, d = ((tmp_path / f"{name}.png").read_bytes() for name in ("a", "b", "c", "fresh"))
    assert a == b == d and a != c


def test_eval_reports_accuracy(finished_run, main_cli):
    result = main_cli("eval", finished_run, "--samples-per-label", "2", "--steps", "2")
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


@pytest.mark.parametrize("args,expected", [
    (["--labels", "0,42"], "--labels [0, 42] must lie in [0, 10) for this model"),
    (["--labels", "0,x"], "--labels '0,x' must be comma-separated integers, e.g. 0,1,7"),
    (["--prompt", "a dog"], "--prompt is for text-to-image runs (model=sd15 or sd3); this run takes --labels"),
    (["--num", "0"], "--num and --steps must be positive integers"),
])
def test_sample_rejects_arguments_the_run_cannot_take(finished_run, main_cli, args, expected):
    def grids():
        return sorted(p.name for p in (finished_run / "samples").glob("*.png"))

    before = grids()
    result = main_cli("sample", finished_run, *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {expected}\n")
    assert grids() == before  # nothing written


@pytest.mark.parametrize("args,expected", [
    (["--labels", "0,x"], "--labels '0,x' must be comma-separated integers, e.g. 0,1,7"),
    (["--labels", ","], "--labels ',' must be comma-separated integers, e.g. 0,1,7"),
    (["--labels", "1", "--prompt", "a dog"], "give --labels (class-conditional runs) or --prompt (text-to-image "
                                            "runs), not both"),
    (["--steps", "0"], "--num and --steps must be positive integers"),
])
def test_sample_argument_typos_fail_before_the_model_loads(finished_run, main_cli, monkeypatch, args, expected):
    def refuse(run_dir):
        raise AssertionError("the run's model was loaded")

    monkeypatch.setattr("difftrain.cli.commands.load_run", refuse)
    result = main_cli("sample", finished_run, *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {expected}\n")


def test_sample_from_the_latest_checkpoint_when_final_is_missing(finished_run, main_cli, tmp_path):
    """Without final/, the family builds the model from config.yaml and loads the latest checkpoint's
    weights with the EMA weights over them; the grid equals the one from final/unet (the EMA weights)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "final")
    for source, out in ((finished_run, tmp_path / "final.png"), (run, tmp_path / "ckpt.png")):
        result = main_cli("sample", source, "--labels", "3", "--num", "2", "--steps", "2", "--out", out)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "final.png").read_bytes() == (tmp_path / "ckpt.png").read_bytes()
    shutil.rmtree(run / "checkpoints")
    result = main_cli("sample", run)
    assert result.returncode == 2 and "neither final outputs nor a complete checkpoint" in result.stderr


def test_one_denoise_closure_for_validation_evaluation_and_the_cli(finished_run):
    """The family's generate() is today's sampling loop around `model(x, t, class_labels=...)`, bitwise."""
    from omegaconf import OmegaConf

    from difftrain import registry
    from difftrain.components.sampling import sample
    from difftrain.families.protocol import FinishedRun, ModelFamily, SampleRequest
    from difftrain.families.unet2d import UNet2DFamily

    cfg = OmegaConf.to_container(OmegaConf.load(finished_run / "config.yaml"))
    assert registry.get("model", "unet2d").load() is UNet2DFamily
    run = UNet2DFamily.load_finished(finished_run, cfg, "cpu", lambda: pytest.fail("final/unet exists"))
    assert isinstance(run.unet2d, ModelFamily) and isinstance(run, FinishedRun)
    assert (run.conditioning, run.num_classes, run.resolution) == ("labels", 10, 8)
    # guidance 1 = the plain closure (the guided one is tests/engine/test_engine_runs.py's)
    images, nrow = run.generate(SampleRequest(labels=tuple(range(10)), per_condition=2, steps=2, seed=5,
                                              guidance_scale=1.0))
    labels = torch.arange(10).repeat_interleave(2)
    model = run.unet2d.module
    expected = sample(lambda x, t: model(x, t, class_labels=labels, return_dict=False)[0], run.schedule,
                      (20, 1, 8, 8), 2, 5, "cpu")
    assert nrow == 2 and torch.equal(images, expected)
    request = run.unet2d.validation_request({**cfg["validation"], "labels": [4, 1]}, type("D", (), {"num_classes": 10}))
    assert request == SampleRequest(labels=(4, 1), per_condition=1, steps=2, seed=cfg["validation"]["seed"])


def test_cli_imports_no_diffusers(tmp_path):
    """No module of difftrain/cli imports diffusers (anywhere in it), and `difftrain sample`/`eval` on a run of
    a family whose loading imports nothing leave diffusers unimported: the CLI only dispatches."""
    import ast
    from pathlib import Path

    cli_dir = Path(__file__).resolve().parents[2] / "difftrain" / "cli"
    for path in sorted(cli_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "diffusers" for n in names), f"{path.name} imports {names}"
    (tmp_path / "fake_family.py").write_text(
        "import torch\n"
        "class FakeRun:\n"
        "    family, conditioning, num_classes, resolution = 'fake', 'labels', 3, 8\n"
        "    def generate(self, request):\n"
        "        return torch.zeros(len(request.labels) * request.per_condition, 1, 8, 8), request.per_condition\n"
        "class FakeFamily:\n"
        "    @classmethod\n"
        "    def load_finished(cls, run_dir, cfg, device, checkpoint_tensors):\n"
        "        return FakeRun()\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({
        "model": {"name": "fake"}, "trainer": {"cpu": True}, "data": {"name": "digits", "num_classes": 3},
        "eval": {"samples_per_label": 1, "inference_steps": 1, "seed": 0}}))
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from difftrain import registry
registry.register("model", "fake", "fake_family:FakeFamily", "a family that loads nothing")
from difftrain.cli.main import main
assert main(["sample", {str(run)!r}, "--labels", "0,2", "--num", "2", "--steps", "1"]) == 0
assert main(["sample", {str(run)!r}, "--prompt", "a dog"]) == 2
assert main(["eval", {str(run)!r}]) == 0
print("diffusers modules:", sorted(m for m in sys.modules if m.split(".")[0] == "diffusers"))
"""
    result = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert "diffusers modules: []" in result.stdout
    assert (run / "samples" / "sample_0-2.png").is_file() and (run / "eval.json").is_file()


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
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder

    ds = build_imagefolder(ImageFolderDataConfig(path=str(data), resolution=8), resolve_interpolation_mode("lanczos"),
                           seed=0)
    batch = ds.validation_batch(12)
    assert batch["pixels"].shape == (12, 3, 8, 8) and batch["labels"].tolist() == [0] * 6 + [1] * 6
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    summary = run_training(cfg)
    assert summary["steps"] == 2


def test_imagefolder_errors_are_clear(tmp_path):
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder
    from difftrain.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        build_imagefolder(ImageFolderDataConfig(path=str(tmp_path / "empty")), None, seed=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"1 of 1 images cannot be trained on: x.png \(unreadable"):
        build_imagefolder(ImageFolderDataConfig(path=str(tmp_path / "bad")), None, seed=0)
