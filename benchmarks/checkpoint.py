"""Checkpoint integrity cost: save and verify time of a ~1 GB checkpoint with and without checksums (xxh3, hashed in a background thread as each file is written),
as ratios measured in one run (issue 13: checksums must cost < 10 % of the save time).

    python benchmarks/checkpoint.py [--gb 1.0] [--repeats 3] [--dir /tmp/difftrain-bench-ckpt]

A checkpoint here is what engine/checkpoint.py writes for a model of `--gb` GB of fp32 weights: a
safetensors file and an optimizer-sized torch file (half the weights, as a stand-in), through the real
`begin` / `write_tensors` / `write_torch` / `publish` path (fsync included), with the checksum step on and
off (monkeypatched to a no-op for the baseline). Runs are interleaved; medians are reported. Verification:
`checkpoint.verify` (sizes + CRC-32 of every file) against the size-only `is_complete`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from difftrain.engine import checkpoint as ckpt


def save_once(root: Path, step: int, weights: dict, optimizer: dict) -> float:
    started = time.perf_counter()
    tmp = ckpt.begin(root, step)
    ckpt.write_tensors(tmp, "model.safetensors", weights)
    ckpt.write_torch(tmp, "optimizer.pt", optimizer)
    ckpt.publish(root, tmp, step)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/difftrain-bench-ckpt")
    opts = parser.parse_args()
    root = Path(opts.dir)
    shutil.rmtree(root, ignore_errors=True)
    numel = int(opts.gb * 2**30 / 4 / 1.5)  # weights + half as much optimizer state = --gb in all
    weights = {f"w{i}": torch.randn(numel // 8) for i in range(8)}
    optimizer = {"state": {i: torch.randn(numel // 16) for i in range(8)}}
    real_checksum = ckpt.file_checksum
    times: dict[str, list[float]] = {"save with checksums": [], "save without checksums": [], "verify (checksums)": [],
                                     "is_complete (sizes)": []}
    step = 0
    for _ in range(opts.repeats):
        for with_sums in (True, False):
            step += 1
            ckpt.file_checksum = real_checksum if with_sums else (lambda path, algorithm=None: "none:0")
            times["save with checksums" if with_sums else "save without checksums"].append(save_once(root, step, weights, optimizer))
            ckpt.file_checksum = real_checksum
            path = root / f"checkpoint-{step}"
            if with_sums:
                started = time.perf_counter()
                assert ckpt.verify(path) is None
                times["verify (checksums)"].append(time.perf_counter() - started)
                started = time.perf_counter()
                assert ckpt.is_complete(path)
                times["is_complete (sizes)"].append(time.perf_counter() - started)
            shutil.rmtree(path)
    size = sum(t.numel() * 4 for t in weights.values()) + sum(t.numel() * 4 for t in optimizer["state"].values())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint of {size / 2**30:.2f} GB, median of {opts.repeats} interleaved saves")
    print(f"{'measure':<24}{'seconds':>10}")
    for key, value in med.items():
        print(f"{key:<24}{value:>10.3f}")
    ratio = med["save with checksums"] / med["save without checksums"]
    print(f"save with checksums / without: {ratio:.3f}x (goal < 1.10)")
    print(json.dumps({"gb": round(size / 2**30, 3), **{k: round(v, 4) for k, v in med.items()},
                      "save_ratio": round(ratio, 4)}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
