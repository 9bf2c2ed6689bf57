"""One training run from a validated config: the run folder and resume checks, then setup (engine/setup.py),
the loop (engine/trainer.py), export and evaluation (engine/evaluation.py), and summary.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from difftrain import progress
from difftrain.engine import checkpoint as ckpt
from difftrain.engine.preemption import Preempted, requeue_slurm_job, requeued_slurm_job
from difftrain.engine.run_files import (
    begin_run_log,
    close_train_log,
    config_changes,
    default_run_dir,
    open_train_log,
    prepare_run_dir,
)
from difftrain.engine.trackers import Trackers, check_trackers
from difftrain.errors import UserError, warn


def choose_run_dir(cfg: dict, accelerator, fallback: Path | None = None) -> Path:
    """Decided once, on rank 0, and shared with every rank (timestamps differ between processes)."""
    from accelerate.utils import broadcast_object_list

    if cfg["output_dir"]:
        return Path(cfg["output_dir"]).expanduser().absolute()
    choice = [str((fallback or default_run_dir()).absolute())]
    if accelerator.num_processes > 1:  # after Accelerator(): the process group exists
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0])


def _from_rank0(accelerator, value):
    """rank 0's value on every rank (a collective, so also a barrier)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _write_config(run_dir: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")


def _check_resume_config(run_dir: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    changes = config_changes(saved, cfg)
    if changes:
        raise UserError("resume would silently change the run: " + "; ".join(changes[:8]) +
                        ". Resume with the original values (see config.yaml in the run folder) or start a new run")


def run_training(cfg: dict, fallback_dir: Path | None = None) -> dict:
    """Train, export and evaluate; returns the summary written to summary.json."""
    from difftrain.engine.distributed import make_accelerator

    started = time.perf_counter()
    begin_run_log()  # library log records and warnings go to train.log, not to the console
    check_trackers(cfg["logging"])  # a tracker whose package is missing stops the run before anything is built
    accelerator = make_accelerator(cfg)
    run_dir = choose_run_dir(cfg, accelerator, fallback_dir)
    if not cfg["resume"] and requeued_slurm_job() and (run_dir / "config.yaml").is_file():
        if accelerator.is_main_process:
            warn(f"this SLURM job was requeued: continuing the run in '{run_dir}' from its latest checkpoint")
        cfg = {**cfg, "resume": "latest"}
    resume_from = None
    if cfg["resume"]:
        if not run_dir.is_dir():
            raise UserError(f"resume={cfg['resume']} but output_dir '{run_dir}' does not exist; "
                            "pass the folder of the run to continue")
        resume_from = ckpt.resolve_resume(cfg["resume"], run_dir)
        _check_resume_config(run_dir, cfg)
    problem = None
    if accelerator.is_main_process:
        try:
            prepare_run_dir(run_dir, resuming=bool(cfg["resume"]))
            ckpt.remove_stale(run_dir / "checkpoints")
        except UserError as exc:
            problem = str(exc)
    problem = _from_rank0(accelerator, problem)  # every rank stops with rank 0's error (no rank left waiting)
    if problem is not None:
        raise UserError(problem)
    if accelerator.is_main_process:
        open_train_log(run_dir)
    # the phases' displays (index, caches, class images, export; difftrain/progress.py): rank 0, bars or lines
    shown_before = progress.configure(plain=not cfg["trainer"]["progress"], enabled=accelerator.is_main_process)
    try:
        return _train_export_evaluate(cfg, run_dir, accelerator, resume_from, started)
    except BaseException as exc:  # the whole story in train.log (the console shows the error itself)
        logging.getLogger("difftrain").error("the run stopped: %s", exc, exc_info=not isinstance(exc, UserError))
        raise
    finally:
        progress.configure(**shown_before)
        close_train_log()


def _train_export_evaluate(cfg: dict, run_dir: Path, accelerator, resume_from: Path | None, started: float) -> dict:
    from difftrain.engine.setup import build_run
    from difftrain.engine.trainer import Trainer

    parts = build_run(cfg, run_dir, accelerator)
    trainer = Trainer(parts, cfg["trainer"], cfg["seed"], run_dir, resume_from)
    if accelerator.is_main_process:  # only once everything is built: a load error leaves no "run" behind
        _write_config(run_dir, cfg)
    trackers = Trackers(cfg, run_dir, accelerator.is_main_process, resume_step=trainer.step or None)
    try:
        return _fit_and_finish(run_dir, accelerator, parts, trainer, trackers, started)
    finally:
        trackers.close()


def _fit_and_finish(run_dir: Path, accelerator, parts, trainer, trackers, started: float) -> dict:
    start_step = trainer.step
    try:
        trainer.fit(trackers)
    except Preempted as stopped:
        if accelerator.is_main_process:
            stopped.args = (str(stopped) + requeue_slurm_job(),)
        raise
    summary = {"run_dir": str(run_dir), "steps": trainer.step, "resumed_from_step": start_step or None,
               "seconds": round(time.perf_counter() - started, 2), "world_size": accelerator.num_processes}
    model = parts.strategy.eval_copy()  # every rank: under ZeRO-3 this gathers the weights to rank 0
    if accelerator.is_main_process:
        with progress.phase("export final/", None):
            parts.evaluator.export(model, parts.ema)
        result = parts.evaluator.evaluate(model, parts.ema)
        if result is not None:
            summary["eval"] = result
            (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
            trackers.log(trainer.step, {"eval/accuracy": result["accuracy"]})
        last = _last_metrics(run_dir)
        summary.update({k: last.get(k) for k in ("loss", "val_loss", "val_loss_ema") if k in last})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _last_metrics(run_dir: Path) -> dict:
    merged: dict = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                merged.update({k: v for k, v in json.loads(line).items() if v is not None})
    return merged


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
