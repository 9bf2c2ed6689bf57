"""Hydra -m sweeps through the real CLI (in this process, basic launcher): one job crashes at runtime, the
others' results, the sweep summary and `difftrain report` survive; Optuna gets a float; sweeps refuse to
run inside a multi-process launch."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest
import yaml
from conftest import TINY

SHORT = [*TINY, "trainer.max_steps=2", "trainer.checkpoint_every=0"]


def cli(*args: str) -> int:
    from hydra.core.global_hydra import GlobalHydra

    from difftrain.cli.main import main

    argv = sys.argv
    try:
        return main(list(args))
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """3 jobs; the cosmap job raises RuntimeError in its first step (after passing validation)."""
    from difftrain.engine.trainer import Trainer

    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    real = Trainer.compute_loss

    def crash_for_cosmap(self, *batch):
        if self.objective.weighting.scheme == "cosmap":
            raise RuntimeError("simulated crash in job 1")
        return real(self, *batch)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "compute_loss", crash_for_cosmap)
    try:
        code = cli("train", "-m", *SHORT, "loss_weighting=none,cosmap,min_snr", f"hydra.sweep.dir={sweep_dir}")
    finally:
        mp.undo()
    return sweep_dir, code


def test_a_failing_job_keeps_the_others_and_the_summary(sweep):
    sweep_dir, code = sweep
    assert code == 1  # the CLI reports that a job failed
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (summary["jobs"], summary["failed"]) == (3, 1)
    rows = summary["runs"]
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        (0, "loss_weighting=none", "ok"), (1, "loss_weighting=cosmap", "failed"), (2, "loss_weighting=min_snr", "ok")]
    assert "RuntimeError: simulated crash in job 1" in rows[1]["error"]
    assert json.loads((sweep_dir / "1" / "failed.json").read_text())["traceback"].strip()
    for job in ("0", "2"):
        assert (sweep_dir / job / "final" / "unet" / "config.json").is_file()
        assert json.loads((sweep_dir / job / "summary.json").read_text())["steps"] == 2
    assert rows[0]["loss"] > 0 and rows[0]["val_loss"] > 0 and rows[0]["seconds"] > 0
    with open(sweep_dir / "sweep_summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "failed", "ok"]


def test_report_writes_table_csv_and_figures(sweep, capsys):
    from PIL import Image

    sweep_dir, _ = sweep
    assert cli("report", str(sweep_dir)) == 0
    out = capsys.readouterr().out
    assert "loss_weighting=cosmap" in out and "failed" in out and "loss_weighting=min_snr" in out
    report = sweep_dir / "report"
    with open(report / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2"] and rows[1]["error"]
    assert float(rows[2]["loss"]) > 0 and float(rows[2]["val_loss"]) > 0
    with Image.open(report / "loss_curves.png") as im:
        assert im.width > 300 and im.height > 200
    grid = Image.open(sweep_dir / "0" / "samples" / "step_000002.png")
    with Image.open(report / "samples.png") as im:  # two successful runs side by side
        assert im.width >= 2 * grid.width and im.height > grid.height


def test_report_refuses_a_folder_without_jobs(tmp_path):
    assert cli("report", str(tmp_path)) == 2


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="needs the sweep extra (hydra-optuna-sweeper)")
def test_optuna_sweep_gets_the_objective_as_a_float(tmp_path):
    sweep_dir = tmp_path / "optuna"
    code = cli("train", "-m", *SHORT, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=0", "eval.objective=val_loss",
               "optimizer.lr=interval(0.001,0.004)", f"hydra.sweep.dir={sweep_dir}")
    assert code == 0
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())["runs"]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert best["best_value"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert set(best["best_params"]) == {"optimizer.lr"}


def test_sweep_inside_a_multi_process_launch_is_refused(monkeypatch, capsys):
    from difftrain.cli.train import train_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_command(["-m", "seed=1,2"]) == 2
    assert "cannot run inside a multi-process launch" in capsys.readouterr().err
