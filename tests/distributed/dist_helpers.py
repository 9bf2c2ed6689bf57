"""Launch `python -m difftrain train` (or a worker script) in 2 CPU processes through the real launchers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import TINY, TINY_T2I  # noqa: E402

# 2 processes x batch 4 = the global batch 8 of TINY; 12 steps, a checkpoint every 4
RUN = ["trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.validate_every=12",
       "trainer.checkpoints_total_limit=null"]
TWO = [*RUN, "trainer.batch_size=4"]  # per-process overrides on top of TINY
ONE = [*RUN, "trainer.batch_size=8"]
TWO_PROC = [*TINY, *TWO]  # full command-line overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        out.pop(key, None)  # a previous in-process DeepSpeed run may have set them
    return out


def launcher(kind: str, nproc: int = 2) -> list[str]:
    if kind == "accelerate":  # --multi_gpu is accelerate's torchrun path; difftrain switches it to gloo on CPU
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())]
    return [sys.executable]


def launch(kind: str, args: list[str], *, script: Path | None = None, expect: int = 0, timeout: int = 300,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `difftrain train ARGS` (or `script ARGS`) under a launcher; assert the exit code."""
    target = [str(script)] if script is not None else ["-m", "difftrain", "train"]
    cmd = [*launcher(kind), *target, *args]
    proc = subprocess.run(cmd, env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}) for {' '.join(cmd)}\n{output[-6000:]}"
    return proc


def killed_after(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a finished run as if it had been killed right after checkpoint `keep_step`."""
    import shutil

    from difftrain.engine import checkpoint as ckpt

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for step, path in ckpt.complete_checkpoints(dst / "checkpoints"):
        if step > keep_step:
            shutil.rmtree(path)
    return dst


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "loss" in r]


def sdxl_lora_args(pipe: Path, images: Path, run: Path) -> list[str]:
    """A tiny SDXL pipeline with LoRA (EMA on) on a mixed-aspect folder: buckets, one DataLoader worker, random
    flips, lazily filled latent and text caches, 2 x batch 2 for 4 steps, checkpoints at 2 and 4, a validation."""
    base = TINY_T2I
    return [*base, "model=sdxl", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={images}",
            "data.resolution=32", "data.buckets=auto", "data.random_flip=true", "data.cache_latents=true",
            "lora=on", "trainer.batch_size=2", "trainer.num_workers=1", "trainer.max_steps=4",
            "trainer.checkpoint_every=2", "trainer.checkpoints_total_limit=null", "validation.prompts=[picture 0]",
            "validation.num_images=1", "validation.steps=2", f"output_dir={run}"]
