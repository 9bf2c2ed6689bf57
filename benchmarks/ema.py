"""EMA step time: difftrain's EMAModel vs diffusers' EMAModel vs the memory floor.

    python benchmarks/ema.py                      # ~100M fp32 params over 500 tensors
    python benchmarks/ema.py --params 5e6         # quick run
    OMP_NUM_THREADS=1 python benchmarks/ema.py --threads 1   # one core (docs/performance.md)

The floor is one `a.add_(b)` over a single flat tensor holding as many elements as the model: two streams
read, one written, which is the least traffic any EMA update `s <- d*s + (1-d)*p` can do. The "flat lerp_"
row is the same single-tensor pass with lerp's arithmetic (what the EMA update costs without any
per-tensor overhead). The post-hoc rows are `ema=posthoc`'s update (components/posthoc_ema.PostHocEMA, two
power-function profiles by default): each parameter piece is read once for both profiles while it is in cache;
"as 2 passes" is the same arithmetic as one `_foreach_lerp_` pass over every tensor per profile (the
parameters read twice from memory), for comparison. Its traffic floor is 5 streams (read p, s1, s2; write s1, s2) against the single EMA's 3: 5/3 = 1.67x
one EMA update when both are memory bound. Every variant is
timed in the same process, interleaved round-robin (so drift hits all of them alike), after warmup; the table
shows the median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from diffusers.training_utils import EMAModel as DiffusersEMAModel

from difftrain.components.ema import EMAModel
from difftrain.components.posthoc_ema import UPDATE_PIECE_BYTES, UPDATE_PIECE_BYTES_ACCELERATOR, PostHocEMA


def make_params(total: int, n_tensors: int, device: str, layout: str, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    if layout == "uniform":
        weights = torch.ones(n_tensors)
    else:  # "mixed": log-uniform sizes over 4 decades, like a UNet's biases/norms next to its big convs
        weights = torch.exp(torch.rand(n_tensors, generator=g) * 9.2)
    sizes = (weights / weights.sum() * total).long().clamp(min=1)
    sizes[0] += total - int(sizes.sum())
    return [torch.nn.Parameter(torch.randn(int(n), generator=g).to(device)) for n in sizes.tolist()]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6, help="total number of fp32 parameters")
    parser.add_argument("--tensors", type=int, default=500)
    parser.add_argument("--layout", choices=["uniform", "mixed"], default="uniform")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--offload", action="store_true", help="also time difftrain offload=True (CUDA)")
    parser.add_argument("--sigma-rels", default="0.05,0.10", help="profiles of the post-hoc EMA rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total, dev = int(args.params), args.device

    load_before = os.getloadavg()[0]  # other processes on the CPU distort multi-tensor timings badly
    params = make_params(total, args.tensors, dev, args.layout)
    flat_a = torch.randn(total, device=dev)
    flat_b = torch.randn(total, device=dev)
    variants = {
        "floor: flat add_ (2 reads, 1 write)": (lambda: flat_a.add_(flat_b)),
        # same traffic as the floor but lerp's arithmetic: the best any lerp-based EMA can do
        "reference: flat lerp_": (lambda: flat_a.lerp_(flat_b, 1e-4)),
    }
    emas = {
        "difftrain foreach=False (lerp_)": EMAModel(params, foreach=False),
        "difftrain foreach=True (_foreach_lerp_)": EMAModel(params, foreach=True),
        "diffusers foreach=False (default)": DiffusersEMAModel(params, foreach=False),
        "diffusers foreach=True": DiffusersEMAModel(params, foreach=True),
    }
    if args.offload:
        emas["difftrain offload=True"] = EMAModel(params, foreach=True, offload=True)
    for name, ema in emas.items():
        variants[name] = (lambda e=ema: e.step(params))
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(params)  # PostHocEMA takes a module (named parameters)
    sigma_rels = [float(v) for v in args.sigma_rels.split(",")]
    posthoc = PostHocEMA(module, sigma_rels, snapshot_every=10**9)
    k = len(sigma_rels)
    separate = [[p.detach().clone() for p in params] for _ in range(k)]

    def per_profile_passes():  # the same update as k whole passes, one per profile: p read k times
        for shadows, w in zip(separate, (1e-3 * (j + 1) for j in range(k))):
            torch._foreach_lerp_(shadows, params, w)

    posthoc_name, passes_name = f"posthoc {k} profiles (read once)", f"{k} profiles as {k} passes (reference)"
    variants[posthoc_name] = lambda: posthoc.step(module)
    variants[passes_name] = per_profile_passes

    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    synchronize(dev)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            synchronize(dev)
            t0 = time.perf_counter()
            fn()
            synchronize(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = med["floor: flat add_ (2 reads, 1 write)"]
    base = med["diffusers foreach=False (default)"]
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{platform.processor() or 'cpu'}"
    print(f"# EMA step: {total / 1e6:.1f}M fp32 params in {len(params)} tensors ({args.layout}), device={dev} "
          f"({where}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"median of {args.repeats} after {args.warmup} warmup, load average before/after "
          f"{load_before:.2f}/{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"| {'variant':<42} | {'ms':>8} | {'x floor':>7} | {'speedup vs diffusers default':>28} |")
    print(f"|{'-' * 44}|{'-' * 10}:|{'-' * 9}:|{'-' * 30}:|")
    for name, ms in med.items():
        print(f"| {name:<42} | {ms:8.1f} | {ms / floor:7.2f} | {base / ms:28.2f} |")
    one = med["difftrain foreach=True (_foreach_lerp_)"]
    spread = {name: (max(ts) - min(ts)) / statistics.median(ts) for name, ts in times.items()}
    chunk = UPDATE_PIECE_BYTES.get(torch.device(dev).type, UPDATE_PIECE_BYTES_ACCELERATOR)
    print(f"\npost-hoc EMA, {k} profiles (update pieces of {chunk >> 10} KiB): "
          f"{med[posthoc_name] / one:.2f}x one EMA update (difftrain foreach=True), "
          f"{med[posthoc_name] / floor:.2f}x the floor; as {k} passes {med[passes_name] / one:.2f}x; "
          f"traffic floor {(2 * k + 1) / 3:.2f}x (goal <= 1.6x)")
    print("spread (max-min)/median: " + ", ".join(f"{name.split(' (')[0]} {v:.2f}" for name, v in spread.items()))


if __name__ == "__main__":
    main()
