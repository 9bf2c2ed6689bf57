"""The dataset recipes end to end on the tiny SD1-style pipeline (docs/recipes.md): DreamBooth with prior
preservation (class images generated once, both losses logged), two sources with repeats and prior resumed bit
for bit, masked loss, caption processing with the prompt cache turned off, the huber loss."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_pipes import lora_file, losses, one_thread, pipeline_dir, t2i_config, write_images

one_thread = pytest.fixture(autouse=True)(one_thread)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


DREAMBOOTH = ("data=dreambooth", "data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog",
              "data.num_class_images=4", "data.class_image_steps=2", "lora=on", "ema=none", "trainer.batch_size=2")


def test_dreambooth_generates_class_images_once_and_logs_both_losses(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    classes = tmp_path / "class_images"
    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, None, *DREAMBOOTH, f"data.path={images}",
                            f"data.class_data_dir={classes}"))
    made = sorted(p.name for p in classes.iterdir())
    assert made == [f"class-{i:05d}.png" for i in range(4)]
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    rows = [r for r in _rows(run) if "loss" in r]
    assert len(rows) == 4 and all(r["loss_prior"] is not None for r in rows)
    for r in rows:  # every batch pairs its 2 instance images with 2 class images: loss = instance + 1.0 x prior
        assert r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5)
    again = tmp_path / "again"
    run_training(t2i_config(again, "sd15", sd15, None, *DREAMBOOTH, f"data.path={images}",
                            f"data.class_data_dir={classes}", "trainer.max_steps=2"))
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == stamps  # reused, not regenerated
    assert [x[1] for x in losses(again)] == [x[1] for x in losses(run)[:2]]  # the same batches and draws


def test_class_images_are_the_same_whatever_the_number_of_processes(tmp_path, sd15):
    """engine/class_images.py: image i comes from its own generator of (seed, i), so 2 ranks (rank r makes the
    missing i with i mod 2 = r, in other batches: [0, 2, 4] and [1, 3] instead of [0..3] and [4]) write the
    files one process writes. The ranks are played in turn here with stand-in accelerators; what a real
    2-process launch adds is the barrier around the generation."""
    import numpy as np
    from PIL import Image

    from difftrain.engine.class_images import generate_class_images

    family = type("Family", (), {"source": type("Source", (), {"location": str(sd15), "revision": None,
                                                               "variant": None})()})()

    def accelerator(rank, world):
        return type("Accelerator", (), {"process_index": rank, "num_processes": world, "is_main_process": rank == 0,
                                        "device": torch.device("cpu")})()

    entry = {"class_prompt": "a photo of a dog", "resolution": 32, "class_image_steps": 2, "num_class_images": 5}
    assert generate_class_images({**entry, "class_data_dir": str(tmp_path / "one")}, list(range(5)), family,
                                 accelerator(0, 1), seed=3) == 5
    made = [generate_class_images({**entry, "class_data_dir": str(tmp_path / "two")}, list(range(5)), family,
                                  accelerator(rank, 2), seed=3) for rank in (0, 1)]
    assert made == [3, 2]
    names = [f"class-{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names  # no temporary file left
    one = [np.asarray(Image.open(tmp_path / "one" / n)).astype(int) for n in names]
    two = [np.asarray(Image.open(tmp_path / "two" / n)).astype(int) for n in names]
    worst = max(int(np.abs(a - b).max()) for a, b in zip(one, two))
    print(f"largest pixel difference, 1 vs 2 processes: {worst}")
    assert worst == 0
    assert len({a.tobytes() for a in one}) == 5  # five different images


def test_two_sources_with_repeats_and_prior_resume_bitwise(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    style = write_images(tmp_path / "style", n=4, size=(48, 40), captions="txt")
    sources = (f"data.sources=[{{path: '{images}', repeats: 0.5, with_prior_preservation: true, "
               f"class_prompt: a photo of a dog, class_data_dir: '{tmp_path / 'classes'}', num_class_images: 3, "
               f"class_image_steps: 1, prior_loss_weight: 0.5}}, {{name: style, path: '{style}', repeats: 2, "
               "caption_prefix: in sks style, shuffle_tags: true, keep_tags: 1}]")
    extra = ("data=sources", sources, "lora=on", "ema=none", "trainer.batch_size=2", "trainer.max_steps=6",
             "data.random_flip=true", "trainer.checkpoints_total_limit=null", "trainer.checkpoint_every=3")
    full = tmp_path / "full"
    run_training(t2i_config(full, "sd15", sd15, None, *extra))
    rows = [r for r in _rows(full) if "loss" in r]
    assert rows[-1]["samples_seen/photos"] + rows[-1]["samples_seen/style"] == 6 * 2
    # per epoch: photos 8 x 0.5 = 4 and style 4 x 2 = 8 samples, in 6 batches of 2: step 6 ends the epoch
    assert (rows[-1]["samples_seen/photos"], rows[-1]["samples_seen/style"]) == (4, 8)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "checkpoint-6")
    summary = run_training(t2i_config(part, "sd15", sd15, None, *extra, "resume=latest"))
    assert summary["resumed_from_step"] == 3
    assert losses(full) == losses(part)
    def logged(run):  # every logged number of the resumed steps but the throughput
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in _rows(run) if "loss" in r and r["step"] > 3]

    assert logged(full) == logged(part) and "loss_prior" in logged(part)[0]
    a, b = lora_file(full)[0], lora_file(part)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_white_masks_are_no_masks_and_black_halves_change_the_loss(tmp_path, sd15, images):
    from PIL import Image

    from difftrain.engine.run import run_training

    white, half = tmp_path / "white", tmp_path / "half"
    for folder, fill in ((white, None), (half, "left")):
        shutil.copytree(images, folder)
        for image in sorted(folder.glob("img*.png")):
            w, h = Image.open(image).size
            mask = Image.new("L", (w, h), 255)
            if fill:
                mask.paste(0, (0, 0, w // 2, h))
            mask.save(folder / f"{image.stem}_mask.png")
    common = ("trainer.max_steps=2", "ema=none")
    run_training(t2i_config(tmp_path / "plain", "sd15", sd15, images, *common))
    run_training(t2i_config(tmp_path / "white_run", "sd15", sd15, white, *common, "data.masks=files"))
    run_training(t2i_config(tmp_path / "half_run", "sd15", sd15, half, *common, "data.masks=files"))
    assert losses(tmp_path / "white_run") == losses(tmp_path / "plain")
    plain, masked = losses(tmp_path / "plain"), losses(tmp_path / "half_run")
    assert plain[0][1] != masked[0][1] and masked[0][1] < plain[0][1]  # half the pixels weigh nothing


def test_tag_shuffling_turns_the_prompt_cache_off_and_huber_trains(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, images, "trainer.max_steps=2", "ema=none", "data.shuffle_tags=true",
                            "data.caption_prefix=sks", "loss=huber", "loss.delta=0.5", "loss.schedule=snr"))
    cache = run / "cache"  # the captions change every epoch: no prompt-embedding cache was built
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith("text-")]
    assert all(torch.isfinite(torch.tensor(r[1])) for r in losses(run))


def _family_config(family: str, root, run, images, classes, *overrides: str) -> dict:
    from conftest import TINY_T2I
    from tiny_flux import flux_dir
    from tiny_sdxl import build_sdxl

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    if family == "sdxl":
        pipe, keys = (root / "sdxl" if (root / "sdxl").exists() else build_sdxl(root / "sdxl")), ["model=sdxl"]
    elif family == "sd3":
        pipe, keys = pipeline_dir("sd3", root), ["model=sd3", "scheduler=sd3"]
    else:
        pipe, keys = flux_dir("dev", root), ["model=flux", "model.max_sequence_length=16"]
    base = TINY_T2I
    return validate(compose_config([
        *base, *keys, f"model.pretrained={pipe}", "data=dreambooth", f"data.path={images}",
        "data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog", f"data.class_data_dir={classes}",
        "data.num_class_images=2", "data.class_image_steps=1", "data.prior_loss_weight=0.5", "data.masks=files",
        "data.resolution=32", "trainer.batch_size=2", "trainer.max_steps=2", "ema=none",
        "validation.prompts=[a photo of sks dog]", "validation.num_images=1", "validation.steps=1",
        f"output_dir={run}", *overrides]))


@pytest.mark.parametrize("family,mode", [("sdxl", "lora=on"), ("sd3", "lora=none"), ("flux", "lora=on")])
def test_dreambooth_with_masks_on_every_family(tmp_path, family, mode, images):
    from PIL import Image

    from difftrain.engine.run import run_training

    photos = tmp_path / "photos"
    shutil.copytree(images, photos)
    for image in sorted(photos.glob("img*.png"))[:4]:  # half of the images masked on their left half
        w, h = Image.open(image).size
        mask = Image.new("L", (w, h), 255)
        mask.paste(0, (0, 0, w // 2, h))
        mask.save(photos / f"{image.stem}_mask.png")
    run = tmp_path / "run"
    run_training(_family_config(family, tmp_path / "pipes", run, photos, tmp_path / "classes", mode))
    assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == ["class-00000.png", "class-00001.png"]
    rows = [r for r in _rows(run) if "loss" in r]
    assert len(rows) == 2
    for r in rows:  # loss = instance + prior_loss_weight x prior
        assert r["loss"] == pytest.approx(r["loss_instance"] + 0.5 * r["loss_prior"], rel=1e-5)
    assert (run / "final").is_dir()
