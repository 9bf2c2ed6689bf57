"""Two processes on a mixed-aspect folder with buckets, DataLoader workers and the on-disk latent and text
caches (a tiny SDXL pipeline, LoRA, EMA): each rank trains its own one-bucket batches (with SDXL's
micro-conditioning taken from them), the caches are filled lazily by both ranks into one shared folder, and a
resume from a checkpoint repeats the run exactly.

The run is tests/conftest.py's `sdxl_ddp_run` (test_fsdp2 compares FSDP2 with it): each 2-process launch costs
~20 s of imports on this machine, so the folder, worker, flip and cache checks that once had their own SD1.5
run ride on this one (the single-process SD1.5 cache and bucket paths are in tests/t2i and tests/data)."""

from __future__ import annotations

import json

import pytest
from dist_helpers import killed_after, launch, sdxl_lora_args, train_rows

from difftrain.data.cache import verify_cache

pytestmark = pytest.mark.slow


def test_two_processes_train_sdxl_lora_with_buckets_workers_and_caches_and_resume_exactly(sdxl_ddp_run, tmp_path):
    pipe, images, run = sdxl_ddp_run
    buckets = {(b["height"], b["width"]): b["train_samples"]
               for b in json.loads((run / "data" / "buckets.json").read_text()) if b["train_samples"]}
    assert len(buckets) > 1 and sum(buckets.values()) == 24
    latents = [p for p in (run / "cache").glob("latents-*") if p.is_dir()]
    assert len(latents) == 1 and list(latents[0].glob("part-*")) and verify_cache(latents[0]) is None  # filled lazily
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert {r["global_batch"] for r in train_rows(run)} == {4}
    part = killed_after(run, tmp_path / "part", keep_step=2)
    launch("torchrun", sdxl_lora_args(pipe, images, part) + ["resume=latest"], timeout=600)
    keys = ("step", "loss", "lr", "grad_norm", "global_batch")
    assert [[r[k] for k in keys] for r in train_rows(run)] == [[r[k] for k in keys] for r in train_rows(part)]
