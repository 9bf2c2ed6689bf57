"""Bitwise reproducibility, exact resume (also after SIGKILL), transactional checkpoints and pruning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_env, tiny_config
from safetensors.torch import load_file

from difftrain.engine import checkpoint as ckpt
from difftrain.errors import UserError


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = load_file(str(a / "final" / "unet_raw" / "diffusion_pytorch_model.safetensors"))
    rb = load_file(str(b / "final" / "unet_raw" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


EXTRA = ("trainer.max_steps=6", "trainer.grad_accum=2", "data.random_flip=true", "noise.offset=0.05",
         "weighting_scheme=logit_normal", "loss_weighting=min_snr", "dream=on")


def test_two_runs_are_bitwise_identical(tmp_path):
    from difftrain.engine.run import run_training

    run_training(tiny_config(tmp_path / "a", *EXTRA))
    run_training(tiny_config(tmp_path / "b", *EXTRA))
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_resume_from_every_checkpoint_is_exact(tmp_path):
    from difftrain.engine.run import run_training

    full = tmp_path / "full"
    run_training(tiny_config(full, *EXTRA, "trainer.checkpoints_total_limit=null"))
    assert [s for s, _ in ckpt.complete_checkpoints(full / "checkpoints")] == [2, 4, 6]
    for step in (2, 4):
        part = tmp_path / f"from{step}"
        shutil.copytree(full, part)
        shutil.rmtree(part / "final")
        for s, path in ckpt.complete_checkpoints(part / "checkpoints"):
            if s > step:
                shutil.rmtree(path)
        run_training(tiny_config(part, *EXTRA, "trainer.checkpoints_total_limit=null", "resume=latest"))
        _assert_same_run(full, part)


def test_checkpoint_contents_and_pruning(tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.max_steps=6", "trainer.checkpoints_total_limit=2"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]
    files = sorted(p.name for p in (run / "checkpoints" / "checkpoint-6").iterdir())
    assert files == ["ema.json", "ema.safetensors", "lr_scheduler.pt", "manifest.json", "model.safetensors",
                     "optimizer.pt", "trainer_state.json"]
    # non-tensor state loads with weights_only=True (nothing unpickled blindly)
    torch.load(run / "checkpoints" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    # resuming a finished run to a longer max_steps keeps the limit
    run_training(tiny_config(run, "trainer.max_steps=10", "trainer.checkpoints_total_limit=2", "resume=latest"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-8"]


def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    from difftrain.engine import trainer as trainer_module
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    real_publish = ckpt.publish

    def publish_then_die(root, tmp, step, extra=None):
        if step == 4:
            raise RuntimeError("simulated crash between the files and the manifest")
        return real_publish(root, tmp, step, extra)

    monkeypatch.setattr(trainer_module.ckpt, "publish", publish_then_die)
    with pytest.raises(RuntimeError, match="simulated"):
        run_training(tiny_config(run, *EXTRA))
    assert (run / "checkpoints" / ".checkpoint-4.tmp").is_dir()
    assert ckpt.resolve_resume("latest", run) == run / "checkpoints" / "checkpoint-2"
    monkeypatch.setattr(trainer_module.ckpt, "publish", real_publish)
    run_training(tiny_config(run, *EXTRA, "resume=latest"))
    assert not (run / "checkpoints" / ".checkpoint-4.tmp").exists()
    run_training(tiny_config(tmp_path / "ref", *EXTRA))
    _assert_same_run(tmp_path / "ref", run)


def test_truncated_checkpoint_is_never_latest(tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.checkpoints_total_limit=null"))
    model = run / "checkpoints" / "checkpoint-4" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert ckpt.resolve_resume("latest", run) == run / "checkpoints" / "checkpoint-2"
    with pytest.raises(UserError, match="incomplete or corrupt"):
        ckpt.resolve_resume(str(run / "checkpoints" / "checkpoint-4"), run)


def test_resume_refuses_changed_config(tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run))
    with pytest.raises(UserError, match="optimizer.lr"):
        run_training(tiny_config(run, "optimizer.lr=0.5", "resume=latest"))


def test_existing_run_is_never_overwritten(tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run"):
        run_training(tiny_config(run))
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    from difftrain.engine.run import run_training
    from difftrain.engine.trainer import Trainer
    from difftrain.errors import TrainingDiverged

    real = Trainer.compute_loss

    def poisoned(self, *batch):
        loss = real(self, *batch)
        return loss * float("nan") if self.step == 2 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step 3"):
        run_training(tiny_config(run))
    assert [s for s, _ in ckpt.complete_checkpoints(run / "checkpoints")] == [2]


def _cli(*args: str, **kw) -> subprocess.Popen:
    # one OpenMP thread: the reference and the victim run side by side on a 2-core machine
    return subprocess.Popen([sys.executable, "-m", "difftrain", "train", *args],
                            env={**cli_env(), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    """A real process killed with SIGKILL after checkpoint 4 (mid-step or mid-save), then resumed."""
    args = [*TINY, *EXTRA, "trainer.max_steps=40", "trainer.checkpoint_every=4",
            "trainer.checkpoints_total_limit=3"]
    ref = _cli(*args, f"output_dir={tmp_path / 'ref'}")  # the uninterrupted run, beside the victim
    victim = _cli(*args, f"output_dir={tmp_path / 'run'}")
    deadline = time.time() + 240
    while not (tmp_path / "run" / "checkpoints" / "checkpoint-8").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    killed_at = max(s for s, _ in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints"))
    assert killed_at < 40
    resumed = _cli(*args, f"output_dir={tmp_path / 'run'}", "resume=latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    _assert_same_run(tmp_path / "ref", tmp_path / "run")
