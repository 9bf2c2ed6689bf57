"""Content-keyed on-disk caches of VAE latents and prompt embeddings: per-sample rows in memory-mappable
safetensors shards, read lazily (RAM does not grow with the dataset).

A cache is a folder `<kind>-<key>/` in `data.cache_dir` (default RUN_DIR/cache) holding `shard-NNNNN.safetensors`
files of `SHARD_SIZE` items each (tensors named `<item>.<name>`) and, once every shard exists, `manifest.json`.
The key is a SHA-256 over everything that changes the content: for latents the image index (file names, sizes,
mtimes), buckets, crop and interpolation, whether both flips are stored, the VAE (id, config and a weight
fingerprint) and the dtype it runs in; for text the distinct captions, the tokenizers, the text encoders and their
dtype, the sequence length. A different key is a different folder, so a stale cache is never read; each shard
carries the key in its metadata and is checked when opened, and the manifest records every shard's checksum: a
run that reuses a cache verifies it first (a damaged one is rebuilt), and `difftrain verify RUN_DIR` checks it.

The build is split across ranks (shard s is computed by rank s mod world size), writes each shard to a temporary
file and renames it, so a killed build keeps its finished shards and the next run computes only the missing
ones. The shards' bytes depend only on their content: an interrupted and resumed build writes the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from difftrain.errors import UserError, warn
from difftrain.progress import phase

CACHE_VERSION = 2
SHARD_SIZE = 256


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


class ShardReader:
    """Lazy reads of one complete cache: `get(item, name)` memory-maps the item's shard on first use.
    Picklable (DataLoader workers open their own handles)."""

    def __init__(self, folder: Path, key: str, shard_size: int) -> None:
        self.folder, self.key, self.shard_size = folder, key, shard_size
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "key": self.key, "shard_size": self.shard_size, "_open": {}}

    def names(self, item: int) -> list[str]:
        """The tensor names stored for `item` (sorted)."""
        self.get(item, None)
        prefix = f"{item}."
        return sorted(k[len(prefix):] for k in self._open[item // self.shard_size].keys() if k.startswith(prefix))

    def get(self, item: int, name: str | None) -> torch.Tensor | None:
        from safetensors import safe_open

        shard = item // self.shard_size
        handle = self._open.get(shard)
        if handle is None:
            path = self.folder / shard_name(shard)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"cache shard '{path}' cannot be read ({exc}); delete the folder "
                                f"'{self.folder}' and run again to rebuild it") from None
            if (handle.metadata() or {}).get("key") != self.key:
                raise UserError(f"cache shard '{path}' belongs to another cache; delete '{self.folder}' and run "
                                "again")
            self._open[shard] = handle
        return None if name is None else handle.get_tensor(f"{item}.{name}")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


class ShardedCache:
    """The cache of (kind, fields) with `count` items in `folder`."""

    def __init__(self, folder: Path, kind: str, fields: dict, count: int, shard_size: int = SHARD_SIZE) -> None:
        self.kind, self.fields, self.count, self.shard_size = kind, fields, count, shard_size
        self.key = digest({"version": CACHE_VERSION, "kind": kind, "count": count, **fields})
        self.root = folder
        self.folder = folder / f"{kind}-{self.key[:20]}"

    @property
    def shards(self) -> int:
        return (self.count + self.shard_size - 1) // self.shard_size

    def items(self, shard: int) -> list[int]:
        return list(range(shard * self.shard_size, min(self.count, (shard + 1) * self.shard_size)))

    def complete(self) -> bool:
        try:
            return json.loads((self.folder / "manifest.json").read_text()).get("key") == self.key
        except (OSError, ValueError):
            return False

    def missing(self) -> list[int]:
        return [s for s in range(self.shards) if not self._valid_shard(s)]

    def _valid_shard(self, shard: int) -> bool:
        from safetensors import safe_open

        path = self.folder / shard_name(shard)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("key") == self.key
        except Exception:  # noqa: BLE001 (a torn file from a killed build: recompute it)
            return False

    def build(self, compute: Callable[[list[int]], dict[str, torch.Tensor]], accelerator, prune: bool,
              show_progress: bool = True) -> ShardReader:
        """Compute the missing shards (this rank's share), wait for every rank, publish the manifest; a reader."""
        rank, world = accelerator.process_index, accelerator.num_processes
        if accelerator.is_main_process and self.complete():  # a reused cache is checked before it is trusted
            problem = verify_cache(self.folder)
            if problem is not None:
                warn(f"the {self.kind} cache '{self.folder}' is damaged ({problem}); rebuilding it")
                shutil.rmtree(self.folder, ignore_errors=True)
        accelerator.wait_for_everyone()
        if not self.complete():
            todo = [s for s in self.missing() if s % world == rank]
            with phase(f"cache {self.kind}", len(todo), "shards", show_progress and accelerator.is_main_process) as tick:
                for shard in todo:
                    self._write(shard, compute(self.items(shard)))
                    tick()
            accelerator.wait_for_everyone()
            missing = self.missing()  # every rank checks the shared folder: all raise, or none does
            if missing:
                raise UserError(f"the {self.kind} cache in '{self.folder}' lacks shards {missing[:5]} after the "
                                "build; data.cache_dir must be a folder every process can write and read")
            if accelerator.is_main_process:
                sums = {shard_name(s): file_checksum(self.folder / shard_name(s)) for s in range(self.shards)}
                _write_json(self.folder / "manifest.json", {"key": self.key, "kind": self.kind, "count": self.count,
                                                            "shard_size": self.shard_size, "fields": self.fields,
                                                            "checksums": sums})
        if prune and accelerator.is_main_process:  # the run's own cache folder keeps only the current caches
            for old in self.root.glob(f"{self.kind}-*"):
                if old.is_dir() and old != self.folder:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        if not self.complete():
            raise UserError(f"the {self.kind} cache '{self.folder}' is incomplete on this rank; data.cache_dir "
                            "must be a folder every process can read")
        return ShardReader(self.folder, self.key, self.shard_size)

    def _write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / shard_name(shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"key": self.key})
        os.replace(tmp, path)


def file_checksum(path: Path, algorithm: str | None = None) -> str:
    """"<algorithm>:<hex>" of a file, read in 8 MB chunks: xxh3_64 (about 10 GB/s) when the xxhash package is
    installed, else zlib's CRC-32 (about 3 GB/s). Checkpoints and cache shards record it in their manifests."""
    if algorithm is None:
        try:
            import xxhash  # noqa: F401

            algorithm = "xxh3"
        except ImportError:
            algorithm = "crc32"
    with open(path, "rb") as f:
        if algorithm == "xxh3":
            import xxhash

            h = xxhash.xxh3_64()
            while chunk := f.read(8 << 20):
                h.update(chunk)
            return f"xxh3:{h.hexdigest()}"
        import zlib

        crc = 0
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
        return f"crc32:{crc:08x}"


def checksum_matches(path: Path, recorded: str) -> bool:
    """Whether a file still has the checksum recorded for it (with the algorithm it was recorded with)."""
    algorithm = recorded.split(":", 1)[0] if ":" in recorded else "crc32"
    try:
        return file_checksum(path, algorithm) == (recorded if ":" in recorded else f"crc32:{recorded}")
    except ImportError:  # recorded with xxhash, which is not installed here: cannot tell
        return True


def verify_cache(folder: Path) -> str | None:
    """None when a cache folder's manifest lists every shard with a matching checksum, else what is wrong."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json (an unfinished build: the next run completes it)"
    for name, recorded in manifest.get("checksums", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if not checksum_matches(path, recorded):
            return f"{name} does not match its checksum"
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, default=str, indent=1))
    os.replace(tmp, path)
