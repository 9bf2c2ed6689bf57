"""Two processes on a mixed-aspect folder with buckets, DataLoader workers and the on-disk latent and text
caches (a tiny SDXL pipeline, LoRA): each rank trains its own one-bucket batches (with SDXL's micro-conditioning
taken from them), the caches are filled lazily by both ranks into one shared folder, and a resume from a
checkpoint repeats the run exactly.

One run serves every claim: each 2-process launch costs ~20 s of imports on this machine, so the folder,
worker, flip and cache checks that once had their own SD1.5 run ride on this one (the single-process SD1.5
cache and bucket paths are in tests/t2i and tests/data)."""

from __future__ import annotations

import json
import sys

import pytest
from dist_helpers import REPO, TINY, killed_after, launch, train_rows

sys.path.insert(0, str(REPO / "tests" / "t2i"))
sys.path.insert(0, str(REPO / "tests" / "data"))
from mixed_images import write_mixed  # noqa: E402

from difftrain.data.cache import verify_cache  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_processes_train_sdxl_lora_with_buckets_workers_and_caches_and_resume_exactly(tmp_path):
    from tiny_sdxl import build_sdxl

    pipe = build_sdxl(tmp_path / "sdxl")
    images = write_mixed(tmp_path / "images", n=24, captions=True)
    base = [o for o in TINY if not o.startswith(("model.", "validation.labels", "validation.num_per_label"))]

    def args(run):
        return [*base, "model=sdxl", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={images}",
                "data.resolution=32", "data.buckets=auto", "data.random_flip=true", "data.cache_latents=true",
                "lora=on", "trainer.batch_size=2", "trainer.num_workers=1", "trainer.max_steps=4",
                "trainer.checkpoint_every=2", "trainer.checkpoints_total_limit=null", "ema=none",
                "validation.prompts=[picture 0]", "validation.num_images=1", "validation.steps=2",
                f"output_dir={run}"]

    run = tmp_path / "run"
    launch("torchrun", args(run), timeout=600)
    buckets = {(b["height"], b["width"]): b["train_samples"]
               for b in json.loads((run / "data" / "buckets.json").read_text()) if b["train_samples"]}
    assert len(buckets) > 1 and sum(buckets.values()) == 24
    latents = [p for p in (run / "cache").glob("latents-*") if p.is_dir()]
    assert len(latents) == 1 and list(latents[0].glob("part-*")) and verify_cache(latents[0]) is None  # filled lazily
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert {r["global_batch"] for r in train_rows(run)} == {4}
    part = killed_after(run, tmp_path / "part", keep_step=2)
    launch("torchrun", args(part) + ["resume=latest"], timeout=600)
    keys = ("step", "loss", "lr", "grad_norm", "global_batch")
    assert [[r[k] for k in keys] for r in train_rows(run)] == [[r[k] for k in keys] for r in train_rows(part)]
