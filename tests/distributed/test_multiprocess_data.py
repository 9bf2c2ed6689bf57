"""Two processes on a mixed-aspect folder with buckets, DataLoader workers and the on-disk latent and text
caches (a tiny SD1.5 pipeline): each rank trains its own one-bucket batches, the caches are filled lazily by
both ranks into one shared folder, and a resume from a checkpoint repeats the run exactly."""

from __future__ import annotations

import json
import sys

import pytest
from dist_helpers import REPO, TINY, killed_after, launch, train_rows

sys.path.insert(0, str(REPO / "tests" / "t2i"))
sys.path.insert(0, str(REPO / "tests" / "data"))
from mixed_images import write_mixed  # noqa: E402
from tiny_pipes import pipeline_dir  # noqa: E402

from difftrain.data.cache import verify_cache  # noqa: E402

pytestmark = pytest.mark.slow


def _args(pipe, images, run):
    base = [o for o in TINY if not o.startswith(("model.", "validation.labels", "validation.num_per_label"))]
    return [*base, "model=sd15", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={images}",
            "data.resolution=32", "data.buckets=auto", "data.random_flip=true", "data.cache_latents=true",
            "trainer.batch_size=2", "trainer.num_workers=1", "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "trainer.checkpoints_total_limit=null", "ema=none", "validation.prompts=[picture 0]",
            "validation.num_images=1", "validation.steps=2", f"output_dir={run}"]


def test_two_processes_with_buckets_and_caches_resume_exactly(tmp_path):
    pipe = pipeline_dir("sd15", tmp_path / "pipes")
    images = write_mixed(tmp_path / "images", n=24, captions=True)
    run = tmp_path / "run"
    launch("torchrun", _args(pipe, images, run), timeout=600)
    buckets = {(b["height"], b["width"]): b["train_samples"]
               for b in json.loads((run / "data" / "buckets.json").read_text()) if b["train_samples"]}
    assert len(buckets) > 1 and sum(buckets.values()) == 24
    latents = [p for p in (run / "cache").glob("latents-*") if p.is_dir()]
    assert len(latents) == 1 and list(latents[0].glob("part-*")) and verify_cache(latents[0]) is None  # filled lazily
    part = killed_after(run, tmp_path / "part", keep_step=2)
    launch("torchrun", _args(pipe, images, part) + ["resume=latest"], timeout=600)
    keys = ("step", "loss", "lr", "grad_norm", "global_batch")
    assert [[r[k] for k in keys] for r in train_rows(run)] == [[r[k] for k in keys] for r in train_rows(part)]
    assert {r["global_batch"] for r in train_rows(run)} == {4}


def test_two_processes_train_sdxl_lora_with_buckets_and_resume_exactly(tmp_path):
    """model=sdxl (micro-conditioning from each rank's own bucket batches), LoRA, caches, 2 processes."""
    from tiny_sdxl import build_sdxl, write_two_shapes

    pipe = build_sdxl(tmp_path / "sdxl")
    images = write_two_shapes(tmp_path / "photos", per_shape=4)
    base = [o for o in TINY if not o.startswith(("model.", "validation.labels", "validation.num_per_label"))]

    def args(run):
        return [*base, "model=sdxl", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={images}",
                "data.resolution=32", "data.buckets=auto", "data.cache_latents=true", "lora=on",
                "trainer.batch_size=2", "trainer.max_steps=4", "trainer.checkpoint_every=2",
                "trainer.checkpoints_total_limit=null", "validation.prompts=[a photo of a dog]",
                "validation.num_images=1", "validation.steps=2", f"output_dir={run}"]

    run = tmp_path / "run"
    launch("torchrun", args(run), timeout=600)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    part = killed_after(run, tmp_path / "part", keep_step=2)
    launch("torchrun", args(part) + ["resume=latest"], timeout=600)
    keys = ("step", "loss", "lr", "grad_norm", "global_batch")
    assert [[r[k] for k in keys] for r in train_rows(run)] == [[r[k] for k in keys] for r in train_rows(part)]
