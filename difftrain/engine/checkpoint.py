"""Transactional checkpoints.

A checkpoint is written into `checkpoints/.checkpoint-N.tmp/`, every file is flushed and fsynced,
a manifest (file names, sizes and checksums: xxh3, or CRC-32 without the xxhash package) is written last, and only then is the folder renamed to
`checkpoints/checkpoint-N`. "Complete" means the manifest's sizes match the files (cheap: listing and
pruning use it), "verified" that their checksums match too (resume verifies the checkpoint it loads;
`resume=latest` falls back to the newest one that verifies, with a warning naming the ones it skipped).
A run killed mid-save, a truncated file or flipped bits are therefore never resumed from. Old checkpoints are pruned only
after the new one is published. Tensors are safetensors; optimizer/scheduler/RNG state is loaded
with `torch.load(weights_only=True)`; everything else is JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difftrain.data.cache import checksum_matches, file_checksum
from difftrain.errors import UserError, warn

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the manifest has "checksums" (format 1 manifests are checked by size only)
_HASHING: dict[str, object] = {}  # path -> Future of its checksum, started as soon as a file is written


def _hash_soon(path: Path) -> None:
    """Checksum a just-written file in a background thread (the hash releases the GIL), overlapping it with the
    next writes and the fsyncs; `publish` collects the result."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="difftrain-checksum")
    _HASHING[str(path)] = _POOL.submit(file_checksum, path)


_POOL = None



def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".checkpoint-{step}.tmp"


def begin(root: Path, step: int) -> Path:
    """Fresh temporary folder for checkpoint `step` (a stale one from a killed run is removed)."""
    tmp = tmp_dir_for(root, step)
    for stale in [k for k in _HASHING if k.startswith(f"{tmp}{os.sep}")]:  # from a save that failed
        _HASHING.pop(stale)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_tensors(tmp: Path, filename: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp / filename), metadata={k: str(v) for k, v in (metadata or {}).items()})
    _hash_soon(tmp / filename)


def write_torch(tmp: Path, filename: str, obj) -> None:
    torch.save(obj, tmp / filename)
    _hash_soon(tmp / filename)


def publish(root: Path, tmp: Path, step: int, extra: dict | None = None) -> Path:
    """Manifest last, fsync everything, then atomically rename the folder into place. Files in subfolders
    (DeepSpeed's engine shards, written by every rank) are listed by their relative path."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        _fsync_file(tmp / name)
    for sub in sorted({(tmp / name).parent for name in files} - {tmp}):
        _fsync_dir(sub)
    manifest = {"format": FORMAT_VERSION, "step": step,
                "files": {name: (tmp / name).stat().st_size for name in files},
                "checksums": {name: _checksum(tmp / name) for name in files}, **(extra or {})}
    write_json(tmp / MANIFEST, manifest)
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    final = root / f"checkpoint-{step}"
    if final.exists():  # a re-save of the same step (e.g. final after periodic): replace atomically
        trash = root / f".checkpoint-{step}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _checksum(path: Path) -> str:
    """The background checksum of a file written through this module, else computed now."""
    future = _HASHING.pop(str(path), None)
    return future.result() if future is not None else file_checksum(path)


def is_complete(path: Path) -> bool:
    """True if the manifest exists and every listed file has its recorded size."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(path: Path) -> str | None:
    """None when every file of the checkpoint has its recorded size and checksum, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, sums = manifest["files"], manifest.get("checksums", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {MANIFEST} ({type(exc).__name__})"
    for name, size in files.items():
        file = path / name
        try:
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
            if name in sums and not checksum_matches(file, sums[name]):
                return f"{name} does not match its checksum (the file changed after it was written)"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
    return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale(root: Path) -> list[Path]:
    """Delete temporary folders left by a killed save (never a published checkpoint)."""
    stale = [p for p in root.glob(".checkpoint-*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune(root: Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; incomplete folders named checkpoint-N go too."""
    if keep is None:
        return []
    complete = complete_checkpoints(root)
    doomed = [path for _, path in complete[:-keep]] if len(complete) > keep else []
    doomed += [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir() and not is_complete(p)]
    removed = []
    for path in doomed:
        if protect is not None and path.resolve() == protect.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """'latest' -> the newest checkpoint that verifies (None if there is none); else a verified path."""
    root = output_dir / "checkpoints"
    if resume == "latest":
        complete = complete_checkpoints(root)
        for _, path in reversed(complete):
            problem = verify(path)
            if problem is None:
                return path
            warn(f"checkpoint '{path}' fails verification ({problem}); skipping it and trying the one before")
        if complete:
            raise UserError(f"every checkpoint in '{root}' fails verification (see the warnings above); resume "
                            "from a copy you trust with resume=<path>, or start a new run")
        return None
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / resume
    if not path.is_dir():
        raise UserError(f"resume='{resume}' is not a checkpoint folder (looked at '{path}'); "
                        "use resume=latest or the path of a checkpoints/checkpoint-N folder")
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint '{path}' is incomplete or corrupt ({problem}); resume from another one, "
                        "e.g. resume=latest (the newest checkpoint that verifies)")
    return path


def read_json(path: Path, name: str) -> dict:
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint '{path}' has an unreadable {name} ({exc}); resume from another checkpoint") from None


def read_tensors(path: Path, filename: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / filename))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise UserError(f"checkpoint '{path}' has a corrupt {filename} ({exc}); resume from another checkpoint") from None


def read_torch(path: Path, filename: str):
    try:
        return torch.load(path / filename, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' has a corrupt {filename} ({exc}); resume from another checkpoint") from None
