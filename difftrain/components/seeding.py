"""Seeding and determinism.

`set_seed(seed)` does what `diffusers.training_utils.set_seed` does (python `random`, numpy, torch CPU and every
CUDA device, or every NPU device when an NPU is present). Two additions:

* `set_seed(seed, deterministic=True)` also switches PyTorch into deterministic mode (deterministic algorithms,
  cuDNN deterministic and not benchmarking, TF32 off, `CUBLAS_WORKSPACE_CONFIG` set when missing).
* `seed_for(seed, rank, stream)` derives a stable, independent seed for a dedicated `torch.Generator`
  (one per rank and per purpose: noise, timesteps, caption dropout, ...). Seeding every rank with the same seed
  makes every rank draw the same noise; `seed + rank` makes stream `a` of rank 1 equal stream `b` of rank 0 when
  the streams use neighbouring seeds. A hash avoids both.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings

import numpy as np
import torch

__all__ = ["CUBLAS_WORKSPACE_CONFIG", "make_generator", "seed_for", "set_seed"]

#: Value exported as ``CUBLAS_WORKSPACE_CONFIG`` by ``set_seed(..., deterministic=True)`` when unset.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"

# Derived seeds are kept below 2**63 so they fit a signed 64-bit integer (torch accepts them everywhere).
_SEED_MASK = (1 << 63) - 1


def _npu_available() -> bool:
    npu = getattr(torch, "npu", None)
    if npu is None:
        return False
    try:
        return bool(npu.is_available())
    except (RuntimeError, AttributeError):  # pragma: no cover - depends on the torch_npu build
        return False


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed `random`, `numpy` and `torch` (CPU and all CUDA or NPU devices).

    Args:
        seed: The seed. numpy only accepts seeds in ``[0, 2**32)``; a larger seed raises numpy's ValueError.
        deterministic: Also make PyTorch deterministic: ``torch.use_deterministic_algorithms(True)``,
            ``cudnn.deterministic = True``, ``cudnn.benchmark = False``, TF32 off for matmul and cuDNN
            (``float32_matmul_precision = "highest"``) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment
            when it is not already set. This is process-global state and it is not undone by a later
            ``set_seed(..., deterministic=False)``. cuBLAS only reads the variable when the first CUDA context is
            created, so a warning is issued when CUDA is already initialised and the variable was missing.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if _npu_available():
        torch.npu.manual_seed_all(seed)
    else:
        torch.cuda.manual_seed_all(seed)  # a no-op (lazily queued) without CUDA
    if deterministic:
        _enable_determinism()


def _enable_determinism() -> None:
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn(
                "CUBLAS_WORKSPACE_CONFIG was set after CUDA was initialised; cuBLAS may ignore it. Export "
                f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} before starting the process.",
                RuntimeWarning,
                stacklevel=3,
            )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def seed_for(seed: int, rank: int = 0, stream: str = "noise") -> int:
    """Derive a stable seed for one random stream of one rank.

    The result is ``sha256(f"{seed}:{rank}:{stream}")`` truncated to 63 bits: the same on every machine, Python
    version and run (unlike ``hash()``), and unrelated between ranks and between streams. Use it to seed a
    dedicated ``torch.Generator`` (see `make_generator`); model initialisation should keep using the global
    seed so that every rank starts from the same weights. numpy's legacy ``np.random.seed`` needs a seed below
    ``2**32``: take ``seed_for(...) % 2**32`` there.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    digest = hashlib.sha256(f"{int(seed)}:{int(rank)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``.

    Typical use: ``make_generator(seed_for(cfg.seed, rank, "timesteps"), device)``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator
