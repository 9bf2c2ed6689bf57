"""What a run writes and shows: the run folder, config.yaml, metrics.jsonl, TensorBoard, progress."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

from difftrain.errors import UserError

# keys that may differ between a run and its resume without changing what is trained
RESUME_MAY_CHANGE = ("resume", "output_dir", "trainer.max_steps", "trainer.checkpoint_every",
                     "trainer.checkpoints_total_limit", "trainer.checkpoint_on_signals",
                     "trainer.checkpoint_every_minutes", "trainer.validate_every", "trainer.log_every",
                     "trainer.progress", "trainer.num_workers", "trainer.prefetch_factor", "data.cache_dir",
                     "validation", "eval")


def default_run_dir(now: datetime | None = None) -> Path:
    return Path("outputs") / (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    """Never overwrite a previous run: a folder holding a run (its config.yaml) is only reused to resume."""
    if (run_dir / "config.yaml").exists() and not resuming:
        raise UserError(f"output_dir '{run_dir}' already holds a run; continue it with "
                        f"output_dir={run_dir} resume=latest, or choose a new output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir '{run_dir}' cannot be created or written ({exc.strerror or exc}); choose a "
                        "folder you can write to (output_dir=...) or fix its permissions") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between the saved run config and the current one (that matter)."""
    a, b = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if a.get(key) != b.get(key):
            changed.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changed


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard scalars/images; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop what the interrupted run logged later
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def image(self, tag: str, png_path: Path, step: int) -> None:
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar: step, loss, lr, it/s, ETA (disabled off rank 0 or when asked)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.start_time, self.start_step = time.perf_counter(), start
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
                                TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", rate="-")
        self.bar.start()

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.1f} it/s")

    def stop(self) -> None:
        if self.enabled:
            self.bar.stop()
