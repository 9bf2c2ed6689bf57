"""Engine overhead: time per optimizer step of difftrain's loop against a hand-written minimal PyTorch
loop on the same model, batch and data, measured in one run; plus the time to a config error and the
time from the command to the first finished step.

    python benchmarks/overhead.py [--steps 60] [--repeats 5]

Prints a table of ms/step and ratios. Target: engine <= 1.05x the minimal loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def engine_trainer(tmp: Path, steps: int):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate
    from difftrain.engine.distributed import make_accelerator
    from difftrain.engine.setup import build_run
    from difftrain.engine.trainer import Trainer

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(True) if state is AcceleratorState else state._reset_state()
    cfg = validate(compose_config([f"output_dir={tmp}", "ema=none", "trainer.progress=false",
                                   f"trainer.max_steps={steps * 10}", "trainer.log_every=1000000"]))
    return Trainer(build_run(cfg, tmp, make_accelerator(cfg)), cfg["trainer"], cfg["seed"], tmp), cfg


def minimal_loop(cfg: dict):
    """The loop a person would write by hand: same UNet, AdamW, schedule, batch and data."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from sklearn.datasets import load_digits

    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    model = UNet2DModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()
                           if k not in ("name", "pretrained", "label_dropout", "guidance_scale")})
    o = cfg["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
                            weight_decay=o["weight_decay"], eps=o["eps"])
    lr = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=cfg["trainer"]["max_steps"])
    sched = DDPMScheduler(num_train_timesteps=1000)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target)
    bs = cfg["trainer"]["batch_size"]
    state = {"pos": 0, "perm": torch.randperm(len(images))}

    def step():
        if state["pos"] + bs > len(images):
            state["pos"], state["perm"] = 0, torch.randperm(len(images))
        idx = state["perm"][state["pos"]: state["pos"] + bs]
        state["pos"] += bs
        x0, y = images[idx], labels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (bs,))
        pred = model(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step_fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps * 1000


def cli_timings(tmp: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "difftrain", "train", "ema.decay=1.5"], capture_output=True, cwd=tmp)
    config_error = time.perf_counter() - start
    run = tmp / "first"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "difftrain", "train", f"output_dir={run}", "trainer.log_every=1",
                             "trainer.max_steps=500", "trainer.progress=false", "eval.enabled=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"difftrain train exited with {proc.returncode} before its first step")
        time.sleep(0.005)
    first_step = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return config_error, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = engine_trainer(Path(tmp) / "engine", args.steps)

        def engine_step():
            out = trainer.train_step()
            trainer.step += 1
            return out

        hand = minimal_loop(cfg)
        engine_step(), hand()  # warm-up
        engine_ms, hand_ms = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            engine_ms.append(time_steps(engine_step, args.steps))
            hand_ms.append(time_steps(hand, args.steps))
        config_error, first_step = cli_timings(Path(tmp))
    e, h = statistics.median(engine_ms), statistics.median(hand_ms)
    rows = [("minimal PyTorch loop", h, 1.0), ("difftrain engine (ema=none)", e, e / h)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg['trainer']['batch_size']}, "
          f"{args.steps} steps x {args.repeats} repeats (median)")
    print(f"{'loop':<30}{'ms/step':>10}{'ratio':>8}")
    for name, ms, ratio in rows:
        print(f"{name:<30}{ms:>10.2f}{ratio:>8.3f}")
    print(f"time to a config error: {config_error:.2f} s; time to the first finished step: {first_step:.2f} s")
    print(json.dumps({"engine_ms": e, "minimal_ms": h, "ratio": e / h, "config_error_s": config_error,
                      "first_step_s": first_step}))


if __name__ == "__main__":
    main()
