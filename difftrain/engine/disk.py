"""Saving a checkpoint on a real disk: warn early when space runs short, and turn a failed write (disk full,
quota, permission, read-only) into one paragraph and exit 2, with the temporary folder removed and every
earlier checkpoint intact (they are never touched before the new one is published: engine/checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from difftrain.engine import checkpoint as ckpt
from difftrain.errors import UserError, warn

# what a failed write says, by errno and by the text torch / safetensors wrap it in
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only",
}
DISK_TEXTS = {
    "no space left": "the disk is full", "code: 28": "the disk is full", "disk quota": "the disk quota is exceeded",
    "code: 122": "the disk quota is exceeded", "permission denied": "permission denied", "code: 13": "permission denied",
    "read-only file system": "the file system is read-only", "code: 30": "the file system is read-only",
    "file write failed": "a write failed (is the disk full?)", "unexpected pos": "a write failed (is the disk full?)",
    "iostream error": "a write failed (is the disk full?)",  # torch.save on a full disk (found on a real tmpfs)
}
NEARLY_FULL = 64 << 20  # a write error of any wording with less than this free is a full disk


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def disk_problem(exc: BaseException, folder: Path) -> str | None:
    """What a failed write into `folder` means for the user, or None when it is not a disk problem."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return DISK_ERRORS[e.errno]
    text = str(exc).lower()
    meaning = next((meaning for needle, meaning in DISK_TEXTS.items() if needle in text), None)
    if isinstance(exc, (OSError, RuntimeError)) and free_bytes(folder) < NEARLY_FULL:
        return "the disk is full"
    return meaning


def checkpoint_size(path: Path) -> int:
    try:
        return sum(json.loads((path / ckpt.MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def guarded_save(root: Path, step: int, accelerator, write: Callable[[Path, Path], Path | None]) -> Path | None:
    """`write(root, tmp)` a checkpoint transaction; collective (every rank learns of any rank's disk error)."""
    from accelerate.utils import gather_object

    is_main = accelerator.is_main_process
    kept = ckpt.complete_checkpoints(root)
    previous = checkpoint_size(kept[-1][1]) if kept else 0
    if is_main and previous and free_bytes(root) < 1.2 * previous:
        warn(f"only {human(free_bytes(root))} free for checkpoints in '{root}', and the last checkpoint took "
             f"{human(previous)}: the next save may fail; free space or move output_dir to a larger disk")
    tmp = ckpt.tmp_dir_for(root, step)
    problem, final = None, None
    try:
        if is_main:
            ckpt.begin(root, step)
        final = write(root, tmp)
    except Exception as exc:  # noqa: BLE001 (OSError, torch's RuntimeError, SafetensorError wrap the errno)
        meaning = disk_problem(exc, root)
        if meaning is None:
            raise
        problem = (f"writing checkpoint-{step} into '{root}' failed: {meaning} ({str(exc).splitlines()[0][:200]}). "
                   f"{human(free_bytes(root))} is free there" + (f"; the last checkpoint took {human(previous)}"
                                                                 if previous else "") +
                   ". The half-written folder was removed and every earlier checkpoint is intact"
                   + (f" (the newest: {kept[-1][1].name})" if kept else "") +
                   ". Free space (or set output_dir on a disk with room), then continue with "
                   f"output_dir={root.parent} resume=latest")
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    problems = [p for p in gather_object([problem]) if p] if accelerator.num_processes > 1 else [problem] * bool(problem)
    if is_main and problems:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if problems:
        raise UserError(problems[0])
    return final
