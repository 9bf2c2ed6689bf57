"""One progress display per phase of a run: the index scan, each cache build, the class-image generation and
the export (the training loop has its own bar with loss and lr: engine/run_files.py `Progress`).

A phase is a rich progress bar, or, with `trainer.progress=false` (logs and CI), one plain line when it starts
and one when it ends:

    index: start, 12 files
    index: done, 12 files in 0.3 s
    export final/: start
    export final/: done in 1.2 s

Off rank 0 it shows nothing. The start and end lines also go to train.log (logger `difftrain.phase`), bars
or not. engine/run.py sets the mode of a run with `configure`; outside a run (data-report) phases are bars.
A phase inside another one (two rich live displays cannot share the console) shows no bar of its own.

Plain Python with a lazy rich import: data/ uses it, and `import difftrain` stays light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

_mode = {"plain": False, "enabled": True}
_active: list[str] = []  # labels of the phases showing now (at most one bar)
_clock = time.perf_counter
LOGGER = "difftrain.phase"  # (the training loop's lines: difftrain.progress)


def configure(*, plain: bool, enabled: bool) -> dict:
    """Set how phases show (plain lines or bars; enabled = this process shows anything); the previous mode."""
    previous = dict(_mode)
    _mode.update(plain=bool(plain), enabled=bool(enabled))
    return previous


class phase:
    """`with phase("cache latents", len(todo), "shards") as tick: ... tick()` shows one phase. `total` None:
    a phase without steps (a pulsing bar, or the two lines). Nothing at all when `total` is 0 or when disabled
    (this call's `enabled` and the configured mode's)."""

    def __init__(self, label: str, total: int | None, unit: str = "", enabled: bool = True) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.enabled = enabled and _mode["enabled"] and total != 0
        self.done, self.bar = 0, None

    def _count(self, n: int | None) -> str:
        return f"{n} {self.unit}".rstrip() if n is not None else ""

    def _say(self, line: str) -> None:
        logging.getLogger(LOGGER).info(line)
        if _mode["plain"]:
            print(line, flush=True)

    def __enter__(self) -> Callable[..., None]:
        if not self.enabled:
            return lambda n=1: None
        self.started = _clock()
        self._say(f"{self.label}: start" + (f", {self._count(self.total)}" if self.total is not None else ""))
        if not _mode["plain"] and not _active:
            self._start_bar()
        _active.append(self.label)
        return self.tick

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(f"[bold]{self.label}"), BarColumn()]
        if self.total is not None:
            columns += [MofNCompleteColumn(), TextColumn(self.unit), TimeRemainingColumn()]
        else:
            columns += [TimeElapsedColumn()]
        self.bar = Progress(*columns)
        self.task = self.bar.add_task(self.label, total=self.total)
        self.bar.start()

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        _active.remove(self.label)
        if self.bar is not None:
            if exc_type is None and self.total is None:
                self.bar.update(self.task, total=1, completed=1)
            self.bar.stop()
        seconds = f"{_clock() - self.started:.1f} s"
        if exc_type is not None:
            of = f" after {self.done}/{self._count(self.total)}" if self.total is not None else ""
            self._say(f"{self.label}: stopped{of} in {seconds}")
        elif self.total is not None:
            self._say(f"{self.label}: done, {self._count(self.done)} in {seconds}")
        else:
            self._say(f"{self.label}: done in {seconds}")
