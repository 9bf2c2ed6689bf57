"""`difftrain train` before Hydra runs: sweep expansion through Hydra's public override parser, the sweep
folder resolved once, the exit status read from sweep_summary.json, and the CLI modules' shared console."""

from __future__ import annotations

import json
import os
import re
import time

from difftrain.cli import console, main, sweep, train


def test_sweeps_expand_in_the_basic_sweepers_order():
    jobs = train._job_overrides(["seed=1", "loss_weighting=none,min_snr", "ema.decay=0.9,0.99", "seed=2"], True)
    assert jobs == [["seed=2", "loss_weighting=none", "ema.decay=0.9"],
                    ["seed=2", "loss_weighting=none", "ema.decay=0.99"],
                    ["seed=2", "loss_weighting=min_snr", "ema.decay=0.9"],
                    ["seed=2", "loss_weighting=min_snr", "ema.decay=0.99"]]
    assert train._job_overrides(["trainer.max_steps=range(1,4)", "+x=1"], True) == \
        [["trainer.max_steps=1", "+x=1"], ["trainer.max_steps=2", "+x=1"], ["trainer.max_steps=3", "+x=1"]]
    # an interval (Optuna's search space) cannot be enumerated: its key keeps the config's value
    assert train._job_overrides(["optimizer.lr=interval(0.001,0.004)", "seed=3"], True) == [["seed=3"]]
    assert train._job_overrides(["seed=1,2"], False) == [["seed=1,2"]]


def test_the_sweep_folder_is_resolved_once_before_hydra_runs(tmp_path):
    assert train.resolve_sweep_dir([f"hydra.sweep.dir={tmp_path / 's'}", "seed=1,2"]) == str(tmp_path / "s")
    assert train.resolve_sweep_dir(["hydra.sweep.dir=out/${hydra.job.name}", "seed=1"]) == "out/train"
    assert re.fullmatch(r"outputs/sweep_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", train.resolve_sweep_dir(["seed=1,2"]))
    assert train.resolve_sweep_dir(["hydra/launcher=no_such_launcher"]) is None


def test_the_exit_status_comes_from_the_sweep_summary(tmp_path):
    assert sweep.failed_jobs(tmp_path) is None
    sweep.write_summary(tmp_path, [{"status": "ok"}, {"status": "failed"}, {"status": "failed"}])
    assert json.loads((tmp_path / "sweep_summary.json").read_text())["failed"] == 2
    assert sweep.failed_jobs(tmp_path) == 2
    assert sweep.failed_jobs(tmp_path, since=time.time() - 1) == 2
    old = time.time() - 3600
    os.utime(tmp_path / "sweep_summary.json", (old, old))  # an earlier sweep's summary in the same folder
    assert sweep.failed_jobs(tmp_path, since=time.time()) is None
    assert not hasattr(sweep, "LAST_SUMMARY")


def test_cli_modules_share_one_console_module():
    assert main.print_error is console.print_error and main.strip_local_rank is console.strip_local_rank
    for module in (train, sweep):
        assert "difftrain.cli.main" not in open(module.__file__).read()
