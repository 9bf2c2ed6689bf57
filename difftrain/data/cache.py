"""Content-keyed caches of VAE latents and prompt embeddings, rows indexed by dataset index.

A cache is one safetensors file `<kind>-<key>.safetensors` in `data.cache_dir` (default RUN_DIR/cache).
The key is a SHA-256 over everything that changes its content: for latents the preprocessed pixels
(so resolution, crop, interpolation and the image files), whether both flips are stored, the VAE (id,
config and a weight fingerprint) and the dtype it runs in; for text the captions in dataset order, the
tokenizers, the text encoders and their dtype, the sequence length. A different key is a different file,
so a stale cache is never read; the key and its fields are also stored in the file's metadata and checked on
load. Rank 0 computes and writes (temporary file, then rename); every rank then reads the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from difftrain.errors import UserError

CACHE_VERSION = 1


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape included)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def cached_tensors(cache_dir: Path, kind: str, fields: dict, compute: Callable[[], dict[str, torch.Tensor]],
                   accelerator, prune: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """Load the cache of (kind, fields) or compute it on rank 0 and write it; returns (tensors, path)."""
    key = digest({"version": CACHE_VERSION, "kind": kind, **fields})
    path = cache_dir / f"{kind}-{key[:20]}.safetensors"
    tensors = None
    if accelerator.is_main_process:
        tensors = _load(path, key)
        if tensors is None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
            _write(path, tensors, key, fields)
            if prune:  # the run's own cache folder keeps only the current file of each kind
                for old in cache_dir.glob(f"{kind}-*.safetensors"):
                    if old != path:
                        old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if tensors is None:
        tensors = _load(path, key)
        if tensors is None:
            raise UserError(f"the {kind} cache '{path}' written by rank 0 is missing or unreadable on this rank; "
                            "data.cache_dir must be a folder every process can read")
    return tensors, path


def _load(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 (truncated or corrupt: recompute)
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor], key: str, fields: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key, "fields": json.dumps(fields, sort_keys=True, default=str)})
    os.replace(tmp, path)


def encode_latent_parameters(vae, images: torch.Tensor, flips: bool, batch_size: int, device,
                             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The VAE's latent distribution parameters (mean, logvar) of every image; rows [N, 2N) are the mirrored
    images when `flips` (row = index + N * flipped)."""
    sources = [images, images.flip(-1)] if flips else [images]
    rows = []
    with torch.no_grad():
        for source in sources:
            for start in range(0, len(source), batch_size):
                px = source[start : start + batch_size].to(device=device, dtype=dtype)
                rows.append(vae.encode(px).latent_dist.parameters.cpu())
    return {"parameters": torch.cat(rows)}
