"""What a run writes and shows: the run folder, config.yaml, metrics.jsonl (and the trackers of
engine/trackers.py), progress bars or plain progress lines, train.log and a console without library noise."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from difftrain.errors import UserError

# keys that may differ between a run and its resume without changing what is trained
RESUME_MAY_CHANGE = ("resume", "output_dir", "trainer.max_steps", "trainer.checkpoint_every",
                     "trainer.checkpoints_total_limit", "trainer.checkpoint_on_signals",
                     "trainer.checkpoint_every_minutes", "trainer.validate_every", "trainer.log_every",
                     "trainer.progress", "trainer.num_workers", "trainer.prefetch_factor", "data.cache_dir",
                     "validation", "eval", "logging",
                     # speed settings (engine/compile.py): same weights and keys, eager or compiled
                     "trainer.compile", "trainer.allow_tf32", "trainer.channels_last")


def default_run_dir(now: datetime | None = None) -> Path:
    return Path("outputs") / (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")


def make_writable_folder(folder: Path) -> None:
    """Creates `folder` and writes (then removes) a probe file in it; raises OSError when it cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def prepare_run_dir(run_dir: Path, resuming: bool) -> None:
    """Never overwrite a previous run: a folder holding a run (its config.yaml) is only reused to resume."""
    if (run_dir / "config.yaml").exists() and not resuming:
        raise UserError(f"output_dir '{run_dir}' already holds a run; continue it with "
                        f"output_dir={run_dir} resume=latest, or choose a new output_dir")
    try:
        make_writable_folder(run_dir)
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
    """metrics.jsonl (one object per logged step), forwarded to the run's trackers; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None, trackers=None) -> None:
        self.enabled, self.trackers = enabled, trackers
        self.path = run_dir / "metrics.jsonl"
        if enabled and resume_step is not None and self.path.exists():  # drop what the interrupted run logged later
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.trackers is not None:
            self.trackers.log(step, values)

    def image(self, tag: str, png_path: Path, step: int) -> None:
        if self.enabled and self.trackers is not None:
            self.trackers.image(tag, png_path, step)

    def close(self) -> None:
        """The trackers outlive the loop (export and evaluation log too): engine/run.py closes them."""


class Progress:
    """A rich progress bar (step, loss, lr, it/s, ETA), or with `plain` one line per `every` steps instead
    (trainer.progress=false: logs and CI); nothing off rank 0. The lines also go to train.log."""

    def __init__(self, total: int, start: int, enabled: bool, plain: bool = False, every: int = 1,
                 label: str = "train") -> None:
        self.enabled, self.plain, self.every, self.total, self.label = enabled, plain, max(every, 1), total, label
        self.start_time, self.start_step = time.perf_counter(), start
        if not enabled or plain:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
                                TimeRemainingColumn())
        self.task = self.bar.add_task(label, total=total, completed=start, loss="-", lr="-", rate="-")
        self.bar.start()

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        if step % self.every == 0 or step == self.total:
            line = f"{self.label} step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} it/s"
            logging.getLogger("difftrain.progress").info(line)
            if self.plain:
                print(line, flush=True)
        if not self.plain:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.1f} it/s")

    def stop(self) -> None:
        if self.enabled and not self.plain:
            self.bar.stop()


# ---- train.log and a quiet console -------------------------------------------------------------------
LIBRARY_LOGGERS = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "peft", "DeepSpeed",
                   "deepspeed", "wandb", "mlflow", "PIL", "matplotlib", "urllib3", "filelock", "hydra")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Buffer(logging.Handler):
    """Records from before the run folder is known (imports, config), written into train.log once it is."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


class _ThirdPartyErrors(logging.Filter):
    """The console's share of the log records: errors of the libraries (difftrain prints its own lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR and not record.name.startswith(("difftrain", "py.warnings"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: every warning into train.log; on the console only difftrain's own."""
    import warnings

    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning(text)
    if str(message).startswith("difftrain") or Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"difftrain: warning: {str(message).removeprefix('difftrain: ')}", file=sys.stderr, flush=True)


_PACKAGE = Path(__file__).resolve().parents[1]
_state: dict = {}


def quiet_console() -> None:
    """From here on the console shows difftrain's lines and errors only: library log records and Python
    warnings are buffered for train.log (open_train_log), library progress bars are off. Idempotent."""
    import warnings

    root = logging.getLogger()
    if "buffer" not in _state:
        _state["buffer"] = _Buffer()
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(_ThirdPartyErrors())
        console.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        _state["console"] = console
        root.addHandler(_state["buffer"])
        root.addHandler(console)
        root.setLevel(logging.INFO)
        logging.getLogger("difftrain").setLevel(logging.INFO)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _show_warning  # every time: a warnings.catch_warnings() block may have restored it
    route_library_logs()


def begin_run_log() -> None:
    """The start of a run: a quiet console, and train.log gets the records from here on only, not those that
    code outside a run (or an earlier run's teardown) left in the buffer of this process."""
    quiet_console()
    _state["buffer"].records.clear()


def route_library_logs() -> None:
    """Libraries that print their own log records (a stream handler, no propagation) send them to the root
    logger instead; diffusers', transformers' and huggingface_hub's tqdm bars off. Call again after a library
    was imported late (DeepSpeed, a tracker)."""
    import importlib

    _propagate_printing_loggers()  # torch's first: importing the libraries below may warn through it
    for module, calls in (("diffusers.utils.logging", ("disable_default_handler", "enable_propagation",
                                                       "disable_progress_bar")),
                          ("transformers.utils.logging", ("disable_default_handler", "enable_propagation",
                                                          "disable_progress_bar")),
                          ("huggingface_hub.utils", ("disable_progress_bars",))):
        try:  # the run imports all three anyway; configured before their first model is loaded
            lib = importlib.import_module(module)
        except ImportError:
            continue
        for call in calls:
            getattr(lib, call, lambda: None)()
    _propagate_printing_loggers()


def _propagate_printing_loggers() -> None:
    names = set(LIBRARY_LOGGERS) | {n.split(".")[0] for n in logging.root.manager.loggerDict}
    for name in names - {"difftrain", "py"}:
        lg = logging.getLogger(name)
        printing = [h for h in lg.handlers  # torch's own _StderrHandler is no StreamHandler: ask for its stream
                    if not isinstance(h, logging.FileHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
        for handler in printing:
            lg.removeHandler(handler)
        if printing:
            lg.propagate = True


def open_train_log(run_dir: Path) -> Path:
    """RUN_DIR/train.log (appended on resume): what was buffered, then every record of the run (rank 0)."""
    quiet_console()
    close_train_log()
    path = run_dir / "train.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    buffer = _state["buffer"]
    for record in buffer.records:
        handler.handle(record)
    buffer.records.clear()
    root = logging.getLogger()
    root.removeHandler(buffer)
    root.addHandler(handler)
    _state["file"] = handler
    return path


def close_train_log() -> None:
    """Stop writing train.log (the end of a run; sequential sweep jobs each open their own)."""
    handler = _state.pop("file", None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
        logging.getLogger().addHandler(_state["buffer"])
