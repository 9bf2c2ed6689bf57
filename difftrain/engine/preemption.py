"""Stopping a run cleanly: on a signal (SIGTERM from SLURM and most schedulers before preemption, SIGUSR1
from `#SBATCH --signal`) or on a timer, the run finishes its current optimizer step, writes a checkpoint on
every rank together, says so in one line and exits with PREEMPTED_EXIT.

A handler only records the signal (a second one during the save changes nothing: the save is a transaction
either way). Every rank must stop after the same step, so the flag of each step is summed across ranks: a
signal seen by any rank stops all of them; the timer is rank 0's clock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

from difftrain.errors import UserError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" -- a requeued job resumes with resume=latest


class Preempted(UserError):
    """The run stopped on a signal after writing a checkpoint (not an error: resume=latest continues)."""

    exit_code = PREEMPTED_EXIT
    is_error = False


def requeued_slurm_job() -> bool:
    """True in a SLURM job that was requeued (after a preemption): it should continue its run."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (what submitit does on preemption); the text to print."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    if shutil.which("scontrol") is None:
        return f" (SLURM job {job}: scontrol not found, requeue it yourself)"
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f" (scontrol requeue {job} failed: {(done.stderr or done.stdout).strip()[:200]})"
    return f"; SLURM job {job} requeued: it resumes with resume=latest when it restarts"


class StopRequests:
    """The signals and the timer that make a run checkpoint: `install()`, `due(step)`, `restore()`."""

    def __init__(self, signal_names: list[str], every_minutes: float | None, is_main: bool) -> None:
        self.signal_names, self.is_main = list(signal_names), is_main
        self.every_s = every_minutes * 60 if every_minutes else None
        self.received: str | None = None
        self.last_save = time.monotonic()
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook's worker thread)
        for name in self.signal_names:
            signum = getattr(signal, name, None)
            if signum is None:
                raise UserError(f"trainer.checkpoint_on_signals names '{name}', which this system does not have; "
                                "use SIGTERM, SIGUSR1, SIGUSR2 or SIGINT")
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def due(self, accelerator) -> tuple[bool, bool]:
        """(stop, timed checkpoint) after this step, the same on every rank."""
        stop = self.received is not None
        timed = bool(self.is_main and self.every_s is not None and time.monotonic() - self.last_save >= self.every_s)
        if accelerator.num_processes > 1:
            import torch

            flags = accelerator.reduce(torch.tensor([float(stop), float(timed)], device=accelerator.device),
                                       reduction="sum")
            stop, timed = bool(flags[0] > 0), bool(flags[1] > 0)
        return stop, timed

    def saved(self) -> None:
        self.last_save = time.monotonic()
