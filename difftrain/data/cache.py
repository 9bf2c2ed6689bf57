"""Content-keyed on-disk caches of VAE latents and prompt embeddings: entries of a few named tensors in
memory-mappable safetensors part files, read lazily (RAM does not grow with the dataset).

A cache is a folder `<kind>-<key>/` in `data.cache_dir` (default RUN_DIR/cache) with `count` entries (ids
0..count-1: a sample, and its flip, for latents; a distinct caption for text), each a few tensors named
`<id>.<name>`, in part files `part-<algorithm>-<checksum>.safetensors` of up to PART_SIZE entries. The key is a
SHA-256 over everything that changes the content: for latents the image index (file names, sizes, mtimes),
buckets, crop and interpolation, whether flips are stored, the VAE (id, config and a weight fingerprint) and the
dtype it runs in; for text the distinct captions, the tokenizers, the text encoders and their dtype, the
sequence length. A different key is a different folder, so a stale cache is never read; each part carries the
key in its metadata and is named by the checksum of its bytes, so a run that reuses a cache verifies every part
first (a damaged one is deleted and its entries computed again), and `difftrain verify RUN_DIR` checks them.

`data.cache_fill` says when entries are computed: `ahead`, before step 1 (the missing ones split across
ranks), or lazily, by the training step that first needs one (it encodes what the cache lacks, as an uncached
run would, and hands the rows to an `EntryWriter`, which writes a part every PART_SIZE entries, at each epoch's
end and when the loop stops; DataLoader workers see a new part the next time they miss an entry). Every entry is
computed alone (a batch of one), so its bytes do not depend on the other samples of its batch nor on how it was
filled: runs with a fresh cache, a reused one, a lazily or an ahead-filled one, and a resumed one train on the
same bits. Parts are written under a temporary name and renamed, so a killed run keeps the parts it finished and
never leaves a torn one; an entry two ranks computed at once is the same in both parts, and either serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from difftrain.errors import UserError, warn
from difftrain.progress import phase

CACHE_VERSION = 3
PART_SIZE = 256          # entries per part file
STALE_TMP_S = 3600       # a temporary part file older than this is a killed writer's: deleted at start

Row = dict[str, torch.Tensor]  # the named tensors of one entry


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def module_fingerprint(module: torch.nn.Module | None, samples: int = 1024) -> str:
    """Names, shapes and dtypes of all tensors plus up to `samples` strided values of each.

    Cheap for multi-billion-parameter encoders, and any fine-tune changes it (it touches every weight)."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)].float().cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(picked.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    if tokenizer is None:
        return "none"
    vocab = tokenizer.get_vocab()
    return digest([type(tokenizer).__name__, tokenizer.model_max_length, sorted(vocab.items())])


def part_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.suffix == ".safetensors")
    except OSError:
        return []


def part_checksum(path: Path) -> str | None:
    """The checksum a part's name records ("<algorithm>:<hex>"), None when the name is not a part's."""
    fields = path.name[: -len(".safetensors")].split("-")
    return f"{fields[1]}:{fields[2]}" if len(fields) == 3 and fields[0] == "part" else None


class EntryReader:
    """Reads of one cache folder: `row(entry)` memory-maps the entry's part on first use; an entry not found
    rescans the folder when it changed (a lazy fill writes parts while workers read). Picklable: DataLoader
    workers open their own handles."""

    def __init__(self, folder: Path, key: str, count: int) -> None:
        self.folder, self.key, self.count = folder, key, count
        self._where: dict[int, str] = {}       # entry -> part file name
        self._names: dict[str, dict[int, list[str]]] = {}  # part -> entry -> tensor names
        self._open: dict[str, object] = {}
        self._stamp: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def refresh(self) -> None:
        """Read the headers of parts written since the last look (one stat() when nothing changed)."""
        try:
            stamp = self.folder.stat().st_mtime_ns
        except OSError:
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        for path in part_files(self.folder):
            if path.name not in self._names:
                self.add_part(path)

    def add_part(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != self.key:
                    return
                names: dict[int, list[str]] = {}
                for tensor in f.keys():
                    entry, name = tensor.split(".", 1)
                    names.setdefault(int(entry), []).append(name)
        except Exception:  # noqa: BLE001 (unreadable: its entries are computed again; the next start deletes it)
            return
        self._names[path.name] = names
        for entry in names:
            self._where.setdefault(entry, path.name)

    def __contains__(self, entry: int) -> bool:
        if entry not in self._where:
            self.refresh()
        return entry in self._where

    @property
    def present(self) -> int:
        return len(self._where)

    def names(self, entry: int) -> list[str]:
        """The tensor names stored for `entry` (sorted); [] when it is not cached."""
        return sorted(self._names[self._where[entry]][entry]) if entry in self else []

    def get(self, entry: int, name: str) -> torch.Tensor | None:
        """One tensor of an entry, None when the entry is not cached (yet)."""
        if entry not in self:
            return None
        part = self._where[entry]
        handle = self._open.get(part)
        if handle is None:
            from safetensors import safe_open

            path = self.folder / part
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"cache part '{path}' cannot be read ({exc}); delete the folder '{self.folder}' "
                                "and run again to rebuild it") from None
            self._open[part] = handle
        return handle.get_tensor(f"{entry}.{name}")

    def row(self, entry: int) -> Row | None:
        names = self.names(entry)
        return {name: self.get(entry, name) for name in names} if names else None


class EntryCache:
    """The cache of (kind, fields) with `count` entries in `root`/<kind>-<key>."""

    def __init__(self, root: Path, kind: str, fields: dict, count: int, part_size: int = PART_SIZE) -> None:
        self.kind, self.fields, self.count, self.part_size = kind, fields, count, part_size
        self.key = digest({"version": CACHE_VERSION, "kind": kind, "count": count, **fields})
        self.root = root
        self.folder = root / f"{kind}-{self.key[:20]}"

    def reader(self) -> EntryReader:
        reader = EntryReader(self.folder, self.key, self.count)
        reader.refresh()
        return reader

    def missing(self) -> list[int]:
        reader = self.reader()
        return [e for e in range(self.count) if e not in reader._where]

    def write_part(self, rows: dict[int, Row]) -> Path:
        """One part file of `rows` (entry -> named tensors), atomically: a temporary file, then renamed."""
        from safetensors.torch import save

        tensors = {f"{entry}.{name}": t.detach().cpu().contiguous() for entry in sorted(rows)
                   for name, t in rows[entry].items()}
        data = save(tensors, metadata={"key": self.key})
        algorithm, value = bytes_checksum(data).split(":")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{algorithm}-{value}.safetensors"
        tmp = self.folder / f".{path.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def drop_damaged(self) -> None:
        """Delete parts that fail their checksum or belong to another key, and killed writers' temporary files
        (the main process, before any rank reads)."""
        if not self.folder.is_dir():
            return
        damaged = [p for p in part_files(self.folder) if verify_part(p, self.key) is not None]
        for path in damaged:
            path.unlink(missing_ok=True)
        if damaged:
            warn(f"the {self.kind} cache '{self.folder}' had {len(damaged)} damaged part file(s) "
                 f"({damaged[0].name}, ...); deleted them, their entries are computed again")
        for tmp in self.folder.glob(".part-*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass

    def open(self, accelerator, fill: str, compute: Callable[[list[int]], dict[int, Row]], prune: bool,
             show_progress: bool = True) -> EntryReader:
        """Check a reused cache, compute the missing entries first when `fill` is "ahead" (this rank's share:
        every world-th of them), drop other caches of this kind (`prune`); a reader of it."""
        rank, world = accelerator.process_index, accelerator.num_processes
        if accelerator.is_main_process:
            self.drop_damaged()
        accelerator.wait_for_everyone()
        if fill == "ahead":
            todo = self.missing()[rank::world]
            with phase(f"cache {self.kind}", len(todo), "entries", show_progress and accelerator.is_main_process) as tick:
                for start in range(0, len(todo), self.part_size):
                    chunk = todo[start : start + self.part_size]
                    self.write_part(compute(chunk))
                    tick(len(chunk))
            accelerator.wait_for_everyone()
            missing = self.missing()  # every rank checks the shared folder: all raise, or none does
            if missing:
                raise UserError(f"the {self.kind} cache in '{self.folder}' lacks entries {missing[:5]} after "
                                "filling it; data.cache_dir must be a folder every process can write and read")
        if prune and accelerator.is_main_process:  # the run's own cache folder keeps only the current caches
            for old in self.root.glob(f"{self.kind}-*"):
                if old.is_dir() and old != self.folder:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return self.reader()


class EntryWriter:
    """The lazy fill: entries the training step computed, kept until written as one part file (every
    `part_size` entries, and on `flush()`: the loop's epoch ends, checkpoints and stop). A write that fails
    (a full disk) warns once and stops the fill: training goes on computing what the cache lacks."""

    def __init__(self, cache: EntryCache, reader: EntryReader) -> None:
        self.cache, self.reader = cache, reader
        self.pending: dict[int, Row] = {}
        self.failed = False

    def lookup(self, entry: int) -> Row | None:
        row = self.pending.get(entry)
        return row if row is not None else self.reader.row(entry)

    def get_or_compute(self, entry: int, compute: Callable[[], Row]) -> Row:
        """The entry's row: waiting to be written or written (by any process), else computed now and added."""
        row = self.lookup(entry)
        if row is None:
            row = compute()
            self.add(entry, row)
        return row

    def add(self, entry: int, row: Row) -> None:
        if self.failed or entry in self.reader._where:
            return
        self.pending[entry] = {k: v.detach().cpu() for k, v in row.items()}
        if len(self.pending) >= self.cache.part_size:
            self.flush()

    @property
    def complete(self) -> bool:
        """Every entry is known to this process (written, or waiting to be)."""
        return self.reader.present + sum(e not in self.reader._where for e in self.pending) >= self.cache.count

    def flush(self) -> None:
        if not self.pending or self.failed:
            return
        try:
            path = self.cache.write_part(self.pending)
        except OSError as exc:
            self.failed = True
            warn(f"could not write to the {self.cache.kind} cache '{self.cache.folder}' ({exc}); training goes "
                 "on without filling it (entries are encoded in each step). Free space on that disk or set "
                 "data.cache_dir to another folder")
        else:
            self.reader.add_part(path)
        self.pending.clear()


def _hasher(algorithm: str):
    if algorithm == "xxh3":
        import xxhash

        return xxhash.xxh3_64()

    class Crc:
        value = 0

        def update(self, chunk: bytes) -> None:
            self.value = zlib.crc32(chunk, self.value)

        def hexdigest(self) -> str:
            return f"{self.value:08x}"

    return Crc()


def _default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3"
    except ImportError:
        return "crc32"


def bytes_checksum(data: bytes, algorithm: str | None = None) -> str:
    algorithm = algorithm or _default_algorithm()
    h = _hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def file_checksum(path: Path, algorithm: str | None = None) -> str:
    """"<algorithm>:<hex>" of a file, read in 8 MB chunks: xxh3_64 (about 10 GB/s) when the xxhash package is
    installed, else zlib's CRC-32 (about 3 GB/s). Checkpoints record it in their manifests, cache parts in
    their names."""
    algorithm = algorithm or _default_algorithm()
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def checksum_matches(path: Path, recorded: str) -> bool:
    """Whether a file still has the checksum recorded for it (with the algorithm it was recorded with)."""
    algorithm = recorded.split(":", 1)[0] if ":" in recorded else "crc32"
    try:
        return file_checksum(path, algorithm) == (recorded if ":" in recorded else f"crc32:{recorded}")
    except ImportError:  # recorded with xxhash, which is not installed here: cannot tell
        return True


def _check_part(path: Path) -> tuple[str | None, str | None]:
    """(what is wrong with a part file or None, the cache key in its metadata): its checksum, then its header."""
    from safetensors import safe_open

    recorded = part_checksum(path)
    if recorded is None:
        return f"{path.name} is not named part-<algorithm>-<checksum>.safetensors", None
    try:
        if not checksum_matches(path, recorded):
            return f"{path.name} does not match its checksum", None
        with safe_open(str(path), framework="pt") as f:
            return None, (f.metadata() or {}).get("key")
    except Exception as exc:  # noqa: BLE001
        return f"{path.name} cannot be read ({exc})", None


def verify_part(path: Path, key: str | None = None) -> str | None:
    """None when a part file matches the checksum in its name (and carries `key`), else what is wrong."""
    problem, found = _check_part(path)
    if problem is not None or key is None or found == key:
        return problem
    return f"{path.name} belongs to another cache"


def verify_cache(folder: Path) -> str | None:
    """None when every part of a cache folder matches its checksum and all carry one key, else what is wrong.
    (A cache still being filled is not damaged: the next run computes its missing entries.)"""
    parts = part_files(folder)
    if not parts and any(p.name.startswith("shard-") for p in folder.iterdir()):
        return "an older cache format (shard files), which this version does not read: delete the folder"
    keys = set()
    for path in parts:
        problem, key = _check_part(path)
        if problem is not None:
            return problem
        keys.add(key)
    return None if len(keys) <= 1 else f"parts of {len(keys)} different caches"
