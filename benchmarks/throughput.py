"""Training throughput at real model sizes: difftrain's step against a minimal hand-written PyTorch loop.

    python benchmarks/throughput.py --scale small --device cpu                  # seconds per model on a CPU
    python benchmarks/throughput.py --scale full --device cuda --models sd15,sdxl --variants bf16,gc \\
        --batch 1 --resolution 1024 --json out.json

For every model (benchmarks/throughput_models.py: SD1.5 / SDXL UNets, SD3-medium and FLUX.1-dev transformers from
their published configs, random weights) and variant, one process builds the model once and times, interleaved
round by round, (a) difftrain's `Trainer.train_step` (engine/trainer.py: per-step seeding, the family's inputs,
`DiffusionObjective.loss`, accelerate's autocast/accumulate/backward, clipping, optimizer, LR schedule) on a
synthetic cached batch (latents and prompt embeddings, copied host -> device every step, as a cached run's loader
serves them), and (b) the loop a person writes: noise, timesteps, x_t, forward, MSE, backward, clip, the same
optimizer object's step. Both loops share the model and the optimizer, so their memory is comparable.

Variants: fp32; bf16 (autocast, fp32 master weights); gc (bf16 + gradient checkpointing); compile (bf16 +
trainer.compile=regional, compile time reported apart); adamw8bit (bf16 + bitsandbytes AdamW8bit); lora (bf16,
LoRA r16 on the attention projections, base in bf16); qlora (lora on a quantised base: nf4 on CUDA, torchao int8
elsewhere). A variant that cannot run here is listed as "n/a (reason)".

Reported: median s/step of each loop, the ratio difftrain / plain, samples/s, peak memory (CUDA
max_memory_allocated; on CPU the peak RSS sampled every 2 ms), model FLOPs of one step
(torch.utils.flop_counter on the eager model, forward + backward, without recompute), achieved TFLOP/s and MFU
against the GPU's dense peak (PEAK_TFLOPS; none on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput_models as M  # noqa: E402

VARIANTS = ("fp32", "bf16", "gc", "compile", "adamw8bit", "lora", "qlora")
# dense peak TFLOP/s by GPU name substring: (bf16/fp16 tensor cores, tf32)
PEAK_TFLOPS = {"H200": (989.0, 494.7), "H100 SXM": (989.0, 494.7), "H100 PCIe": (756.0, 378.0),
               "H100": (989.0, 494.7), "A100": (312.0, 156.0), "L40S": (362.1, 183.0), "A10G": (70.0, 35.0)}
LORA_RANK = 16


def peak_for(device: torch.device, variant: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return tf32 if variant == "fp32" else bf16
    return None


def unavailable(variant: str, device: torch.device) -> str | None:
    """Why `variant` cannot run on `device`, or None."""
    if variant in ("adamw8bit", "qlora"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            if variant == "adamw8bit":
                return "bitsandbytes not installed"
        if variant == "qlora" and device.type != "cuda":
            try:
                import torchao  # noqa: F401
            except ImportError:
                return "int8 base needs torchao"
    if variant == "compile":
        import shutil

        if device.type == "cpu" and shutil.which("g++") is None and shutil.which("cc") is None:
            return "inductor on CPU needs a C++ compiler"
    return None


class BenchFamily:
    """The part of a model family the engine calls per step, over a synthetic cached batch."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.module, self.call = module, M.caller(name)

    def inputs(self, batch: dict, device, generator=None):
        return batch["latents"].to(device, non_blocking=True), {
            k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "latents"}

    def predict(self, model, x_t, timesteps, cond):
        return self.call(model, x_t, timesteps, cond)

    def trainable_parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]


class FixedStream:
    def __init__(self, batch: dict) -> None:
        self.value = batch

    def batch(self, step: int, micro: int) -> dict:
        return self.value

    def close(self) -> None:
        pass


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled by a thread)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(name: str, scale: str, variant: str, device: torch.device) -> torch.nn.Module:
    """The denoiser as difftrain prepares it for this variant (families/t2i.py order: freeze, cast the base,
    quantise, adapters, adapters to fp32; then gradient checkpointing, then compile)."""
    from difftrain.components.lora import cast_training_params
    from difftrain.families.t2i import cast

    torch.manual_seed(0)
    model = M.build(name, scale).to(device)
    if variant in ("lora", "qlora"):
        from peft import LoraConfig

        cast(model.requires_grad_(False), None, torch.bfloat16)
        if variant == "qlora":
            from difftrain.families.quantize import quantize_frozen_base

            quantize_frozen_base(model, "nf4" if device.type == "cuda" else "int8", device, torch.bfloat16)
        model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                     target_modules=M.LORA_TARGETS[name]))
        cast_training_params(model, torch.float32)
    if variant == "gc":
        model.enable_gradient_checkpointing()
    return model


def plain_step(model, opt, call, batch, flow: bool, alphas, bf16: bool, device) -> torch.Tensor:
    x0 = batch["latents"].to(device, non_blocking=True)
    cond = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "latents"}
    noise = torch.randn_like(x0)
    n = x0.shape[0]
    if flow:
        sigma = torch.rand(n, device=device)
        s = sigma.view(n, 1, 1, 1)
        x_t, target, timesteps = (1 - s) * x0 + s * noise, noise - x0, sigma * 1000
    else:
        t = torch.randint(0, 1000, (n,), device=device)
        a = alphas[t].view(n, 1, 1, 1)
        x_t, target, timesteps = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = call(model, x_t, timesteps, cond)
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def count_flops(model, call, batch, flow, alphas, device, bf16: bool) -> float:
    """FLOPs of one forward + backward (eager), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    noop = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with FlopCounterMode(display=False) as counter:
        plain_step(model, noop, call, batch, flow, alphas, bf16, device)
    return float(counter.get_total_flops())


def engine_parts(name, model, variant, device, batch, steps_total: int, run_dir: Path):
    from difftrain import registry
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.objective import DiffusionObjective
    from difftrain.engine.optim import build_optimizer_on
    from difftrain.engine.setup import RunParts
    from difftrain.engine.strategies import strategy_for
    from difftrain.engine.trainer import Trainer

    reset_accelerate_state()
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no" if variant == "fp32" else "bf16", cpu=device.type == "cpu")
    family = BenchFamily(name, model)
    scheduler = {"name": "sd3"} if M.FLOW[name] else {"name": "ddpm", "beta_schedule": "scaled_linear",
                                                     "beta_start": 0.00085, "beta_end": 0.012}
    objective = DiffusionObjective(registry.build("scheduler", scheduler),
                                   registry.build("weighting_scheme", {"name": "uniform"}),
                                   registry.build("loss_weighting", {"name": "none"}), None)
    if variant == "compile":
        from difftrain.engine.compile import compile_module

        compile_module(model, "regional")
    lr = 1e-4 if variant in ("lora", "qlora") else 1e-5
    optimizer = build_optimizer_on({"name": "adamw8bit" if variant == "adamw8bit" else "adamw", "lr": lr},
                                   family.trainable_parameters(), device)
    lr_scheduler = registry.build("lr_scheduler", {"name": "constant"}, optimizer=optimizer, max_steps=steps_total)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    strategy = strategy_for(accelerator, prepared, optimizer, family)
    parts = RunParts(accelerator, family, None, objective, prepared, optimizer, lr_scheduler, strategy, None,
                     FixedStream(batch), None)
    options = {"grad_accum": 1, "max_grad_norm": 1.0, "max_steps": steps_total}
    return Trainer(parts, options, 0, run_dir), objective


def measure(name: str, variant: str, args, device: torch.device, flops_cache: dict) -> dict:
    row = {"model": name, "variant": variant}
    reason = unavailable(variant, device)
    if reason:
        return {**row, "status": f"n/a ({reason})"}
    batch = M.synthetic_batch(name, args.scale, args.batch, args.resolution)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    flow, call = M.FLOW[name], M.caller(name)
    try:
        kind = "lora" if variant in ("lora", "qlora") else "full"
        if kind not in flops_cache:  # eager, unquantised model of the same trainable set
            probe = make_model(name, args.scale, "lora" if kind == "lora" else "fp32", device)
            alphas = engine_alphas(name, device)
            flops_cache[kind] = count_flops(probe, call, batch, flow, alphas, device, kind == "lora")
            del probe
        model = make_model(name, args.scale, variant, device)
        with tempfile.TemporaryDirectory() as tmp:
            trainer, objective = engine_parts(name, model, variant, device, batch, 10**6, Path(tmp))
            raw_opt = trainer.optimizer.optimizer  # the optimizer object itself (accelerate wraps it)
            alphas = engine_alphas(name, device)
            bf16 = variant != "fp32"
            plain = lambda: plain_step(model, raw_opt, call, batch, flow, alphas, bf16, device)  # noqa: E731
            engine = lambda: trainer.train_step()  # noqa: E731
            start = time.perf_counter()
            for _ in range(args.warmup):  # compile (and the allocator's first growth) happen here
                engine()
                plain()
            sync(device)
            row["warmup_s"] = time.perf_counter() - start
            times, peaks = {"difftrain": [], "plain": []}, {"difftrain": 0, "plain": 0}
            for _ in range(args.rounds):
                for label, fn in (("difftrain", engine), ("plain", plain)):
                    t, peak = timed(fn, args.steps, device)
                    times[label].append(t)
                    peaks[label] = max(peaks[label], peak)
    except torch.OutOfMemoryError:
        return {**row, "status": "n/a (out of memory)"}
    except RuntimeError as exc:  # a combination this stack cannot run: listed, not hidden
        return {**row, "status": f"n/a (error: {str(exc).splitlines()[0][:90]})"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    d, p = statistics.median(times["difftrain"]), statistics.median(times["plain"])
    flops = flops_cache["lora" if variant in ("lora", "qlora") else "full"]
    peak = peak_for(device, variant)
    achieved = flops / d / 1e12
    row.update(status="ok", difftrain_s=d, plain_s=p, ratio=d / p, samples_per_s=args.batch / d,
               peak_mb_difftrain=peaks["difftrain"] / 2**20, peak_mb_plain=peaks["plain"] / 2**20,
               gflop_per_step=flops / 1e9, tflops=achieved, mfu=(achieved / peak) if peak else None,
               params_m=sum(q.numel() for q in model.parameters()) / 1e6,
               trainable_m=sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6)
    return row


def engine_alphas(name: str, device) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float().to(device)


def timed(fn, steps: int, device) -> tuple[float, int]:
    """(seconds per step, peak bytes) of `steps` calls of fn."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated(device)
    with PeakRSS() as rss:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        elapsed = time.perf_counter() - start
    return elapsed / steps, rss.peak


def table(rows: list[dict], device: torch.device) -> str:
    mem = "peak MB (CUDA allocated)" if device.type == "cuda" else "peak RSS MB"
    out = [f"| model | variant | difftrain s/step | plain s/step | ratio | samples/s | {mem} difftrain / plain "
           "| GFLOP/step | TFLOP/s | MFU | warm-up s |", "|" + "---|" * 11]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['model']} | {r['variant']} | {r['status']} |" + " |" * 9)
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no known peak)"
        out.append(f"| {r['model']} | {r['variant']} | {r['difftrain_s']:.4f} | {r['plain_s']:.4f} | "
                   f"**{r['ratio']:.3f}** | {r['samples_per_s']:.2f} | {r['peak_mb_difftrain']:.0f} / "
                   f"{r['peak_mb_plain']:.0f} | {r['gflop_per_step']:.2f} | {r['tflops']:.3f} | {mfu} | "
                   f"{r['warmup_s']:.1f} |")
    return "\n".join(out)


def machine(device: torch.device) -> dict:
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("full", "small"), default="small")
    ap.add_argument("--models", default="sd15,sdxl,sd3,flux")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    ap.add_argument("--batch", type=int, default=None, help="default: 2 (small), 1 (full)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels; default: 64 (small), 512/1024 (full)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [m for m in models if m not in M.FULL] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown model/variant {bad}; models {list(M.FULL)}, variants {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    args.batch = args.batch or (2 if args.scale == "small" else 1)
    rows, flops_cache = [], {}
    for name in models:
        resolution = args.resolution or (64 if args.scale == "small" else (512 if name == "sd15" else 1024))
        run_args = argparse.Namespace(**{**vars(args), "resolution": resolution})
        flops_cache = {}
        for variant in variants:
            row = measure(name, variant, run_args, device, flops_cache)
            row.update(resolution=resolution, batch=args.batch)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(table(rows, device))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
