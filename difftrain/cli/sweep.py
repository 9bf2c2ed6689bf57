"""Many runs: what each job of a Hydra `-m` sweep records, and the summary written when the sweep ends.

Every job writes `job.json` into its own folder (`hydra.sweep.dir/<job num>/`): its overrides, status,
final numbers and time (plus `failed.json` with the error when it failed). Because the record is on disk,
the summary works with any launcher (basic, joblib workers, submitit/SLURM jobs): the `SweepSummary`
callback (registered in conf/train.yaml under hydra.callbacks) reads the job folders in `on_multirun_end`
and writes `sweep_summary.json` and `sweep_summary.csv` next to them. `difftrain report` reads the same
records.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from hydra.experimental.callback import Callback

JOB_FILE = "job.json"
SUMMARY_FILE = "sweep_summary.json"
COLUMNS = ("job", "overrides", "status", "steps", "loss", "val_loss", "val_loss_ema", "accuracy", "seconds",
           "run_dir", "error")


def write_job_record(hydra_cfg, started: float, summary: dict | None = None, error: str | None = None,
                     exit_code: int | None = None, trace: str | None = None) -> dict:
    """job.json (and failed.json for a failure) in the job's folder; returns what the job returns."""
    job_dir = Path(hydra_cfg.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {"job": int(hydra_cfg.job.num), "overrides": list(hydra_cfg.overrides.task),
              "status": "failed" if error is not None else "ok", "seconds": round(time.time() - started, 2)}
    if error is not None:
        record.update(error=error, exit_code=exit_code)
        failed = {"error": error, "exit_code": exit_code, **({"traceback": trace} if trace else {})}
        (job_dir / "failed.json").write_text(json.dumps(failed, indent=2))
    else:
        record["summary"] = summary
    (job_dir / JOB_FILE).write_text(json.dumps(record, indent=2))
    return {"error": error} if error is not None else record


def objective_value(summary: dict, objective: str) -> float | None:
    value = summary.get("eval", {}).get("accuracy") if objective == "accuracy" else summary.get(objective)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def job_result(hydra_cfg, summary: dict, objective: str):
    """The task's return value: the float objective for the Optuna sweeper, else the run summary."""
    target = str(hydra_cfg.sweeper.get("_target_", "")) if "sweeper" in hydra_cfg else ""
    if "optuna" not in target.lower():
        return summary
    from difftrain.cli.console import print_error

    direction = str(hydra_cfg.sweeper.get("direction", "")).lower()
    wanted = "max" if objective == "accuracy" else "min"
    if direction and wanted not in direction:
        print_error(f"warning: the Optuna sweep has direction={direction} but eval.objective={objective} should "
                    f"be {wanted}imized")
    value = objective_value(summary, objective)
    if value is None:  # not a float: Optuna records the trial as failed (NaN would crash its sweeper)
        print_error(f"eval.objective={objective} is missing from this run's summary (is eval.enabled=true "
                    "and the data digits?); the trial counts as failed")
        return {"error": f"no {objective}"}
    return value


def _row(job_dir: Path) -> dict | None:
    """One table row from a job folder (job.json; summary.json / failed.json for older sweeps)."""
    record = None
    if (job_dir / JOB_FILE).is_file():
        record = json.loads((job_dir / JOB_FILE).read_text())
    elif (job_dir / "summary.json").is_file():
        record = {"status": "ok", "summary": json.loads((job_dir / "summary.json").read_text())}
    elif (job_dir / "failed.json").is_file():
        record = {"status": "failed", **json.loads((job_dir / "failed.json").read_text())}
    if record is None:
        return None
    summary = record.get("summary") or {}
    return {"job": record.get("job", int(job_dir.name)), "overrides": list(record.get("overrides", [])),
            "status": record["status"], "steps": summary.get("steps"), "loss": summary.get("loss"),
            "val_loss": summary.get("val_loss"), "val_loss_ema": summary.get("val_loss_ema"),
            "accuracy": (summary.get("eval") or {}).get("accuracy"),
            "seconds": record.get("seconds", summary.get("seconds")),
            "run_dir": summary.get("run_dir", str(job_dir)), "error": record.get("error")}


def collect(sweep_dir: Path) -> list[dict]:
    """Rows of every job folder (named by job number) in the sweep folder, in job order. The `overrides`
    column keeps what differs between jobs (overrides shared by every job are dropped)."""
    if not sweep_dir.is_dir():
        return []
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = [row for row in map(_row, jobs) if row is not None]
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in shared)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict]) -> dict:
    summary = {"sweep_dir": str(sweep_dir), "jobs": len(rows),
               "failed": sum(r["status"] != "ok" for r in rows), "runs": rows}
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    write_csv(sweep_dir / "sweep_summary.csv", rows)
    return summary


def failed_jobs(sweep_dir: Path, since: float | None = None) -> int | None:
    """How many jobs failed, from the sweep_summary.json in `sweep_dir`; None when there is none (or only
    one written before `since`, a time.time(), i.e. by an earlier sweep into the same folder)."""
    path = sweep_dir / SUMMARY_FILE
    if not path.is_file() or (since is not None and path.stat().st_mtime < since - 2.0):  # 2 s: coarse mtimes
        return None
    return int(json.loads(path.read_text()).get("failed", 0))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS} for row in rows)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rich_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("job", "overrides", "status", "steps", "loss", "val_loss", "accuracy", "time (s)"):
        table.add_column(column, overflow="fold")
    for r in rows:
        status = "[green]ok[/green]" if r["status"] == "ok" else f"[red]failed[/red] {r.get('error') or ''}"[:120]
        accuracy = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
        table.add_row(str(r["job"]), r["overrides"], status, _fmt(r["steps"]), _fmt(r["loss"]),
                      _fmt(r["val_loss"]), accuracy, _fmt(r["seconds"], 1))
    return table


class SweepSummary(Callback):
    """Hydra callback: sweep_summary.json/.csv and a table when a -m sweep ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from rich.console import Console

        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        rows = collect(sweep_dir)
        if not sweep_dir.is_dir():
            return
        summary = write_summary(sweep_dir, rows)  # the CLI's exit status is read from it (cli/train.py)
        console = Console()
        if not console.is_terminal:  # piped or logged: do not fold the overrides at 80 columns
            console = Console(width=160)
        console.print(rich_table(rows, f"sweep {sweep_dir} ({summary['failed']} of {len(rows)} failed)"))
        console.print(f"summary: {sweep_dir / 'sweep_summary.csv'}; plots: difftrain report {sweep_dir}")
