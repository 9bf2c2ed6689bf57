"""Runs on mixed-aspect image folders: workers, buckets, per-epoch augmentation, bad data, held-out validation,
mid-run unreadable files, on-disk caches that survive a killed build, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_env, tiny_config
from mixed_images import write_mixed
from safetensors.torch import load_file

from difftrain.errors import UserError

# unet2d on RGB folders at 16 px, buckets of side step 8: (32,8) (24,8) (16,16) (8,24) (8,32)
BUCKETED = ["data=imagefolder", "data.resolution=16", "data.buckets=auto", "data.bucket_step=8",
            "data.random_flip=true", "data.center_crop=false", "trainer.batch_size=2", "validation.labels=[0]",
            "model.num_class_embeds=null"]


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    folder = run / "final" / ("unet_raw" if (run / "final" / "unet_raw").is_dir() else "unet")
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _data(folder: Path, **options):
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder

    defaults = {"resolution": 16, "buckets": "auto", "bucket_step": 8, "random_flip": True, "center_crop": False}
    return build_imagefolder(ImageFolderDataConfig(path=str(folder), **{**defaults, **options}),
                             resolve_interpolation_mode("bilinear"), seed=0, size_multiple=2, cache_folder=None)


def test_workers_0_and_2_give_bitwise_identical_runs_with_buckets(tmp_path):
    from difftrain.engine.run import run_training

    images = write_mixed(tmp_path / "images")
    for workers in (0, 2):
        run_training(tiny_config(tmp_path / f"w{workers}", *BUCKETED, f"data.path={images}", "trainer.max_steps=10",
                                 f"trainer.num_workers={workers}", "ema=none"))
    _same_run(tmp_path / "w0", tmp_path / "w2")
    buckets = json.loads((tmp_path / "w0" / "data" / "buckets.json").read_text())
    # aspect 0.5 -> 24x8 (1:3), 2 -> 8x24, the rest (0.75..1.33) -> 16x16
    assert [(b["height"], b["width"], b["train_samples"]) for b in buckets if b["train_samples"]] == \
        [(24, 8, 2), (16, 16, 12), (8, 24, 2)]


def test_every_micro_batch_is_one_bucket_and_epochs_draw_new_crops_and_flips(tmp_path):
    from difftrain.data.samples import MicroBatchKey

    data = _data(write_mixed(tmp_path / "images"))
    order = data.order(batch_size=2, grad_accum=1, world_size=1, seed=0)
    stream = data.stream(order, rank=0, max_steps=16, num_workers=0, prefetch_factor=2, pin_memory=False)
    for step in range(16):
        batch = stream.batch(step, 0)
        sizes = {data.plan.buckets[data.plan.bucket_of[p]] for p in batch["indices"].tolist()}
        assert sizes == {tuple(batch["pixels"].shape[-2:])} == {batch["target_size"]}
    stream.close()
    per_epoch = [data.samples.__getitems__(MicroBatchKey(0, 0, e, (0,))) for e in range(8)]
    crops = {tuple(b["crop_offsets"][0].tolist()) for b in per_epoch}
    flips = {bool(b["flips"][0]) for b in per_epoch}
    assert len(crops) > 1 and flips == {True, False}  # image 0 (40x30 -> 21x16 covering 16x16) moves and flips
    assert per_epoch[0]["original_sizes"][0].tolist() == [40, 30]


def test_a_file_that_breaks_mid_run_is_replaced_deterministically(tmp_path):
    from difftrain.data.samples import MicroBatchKey

    images = write_mixed(tmp_path / "images")
    data = _data(images, random_flip=False, center_crop=True)
    key = MicroBatchKey(0, 0, 0, (0, 2))  # both 16x16-bucket images
    before = data.samples.__getitems__(key)
    (images / "im000.png").write_bytes(b"garbage")  # broke after the index was built
    with pytest.warns(UserWarning, match="'im000.png' cannot be decoded any more; training on 'im001.png'"):
        after = data.samples.__getitems__(key)
    stand_in = data.samples.__getitems__(MicroBatchKey(0, 0, 0, (1,)))
    assert after["indices"].tolist() == [1, 2] and torch.equal(after["pixels"][0], stand_in["pixels"][0])
    assert after["pixels"].dtype == torch.uint8  # workers send uint8; the stream converts
    assert torch.equal(after["pixels"][1], before["pixels"][1])


def _bad_folder(root: Path) -> Path:
    images = write_mixed(root, n=8)
    good = (images / "im000.png").read_bytes()
    (images / "zero.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "notanimage.jpg").write_bytes(b"hello")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(images / "tiny.png")
    return images


def test_bad_images_are_reported_all_at_once_and_nothing_is_written(tmp_path):
    images = _bad_folder(tmp_path / "images")
    with pytest.raises(UserError) as info:
        _data(images)
    message = str(info.value)
    assert message.startswith("4 of 12 images cannot be trained on: ")
    for name, reason in (("notanimage.jpg", "unreadable: not an image format PIL can open"),
                         ("truncated.png", "truncated PNG (no IEND chunk)"), ("zero.png", "zero-byte file"),
                         ("tiny.png", "too small: 4x4 would be upscaled more than data.max_upscale=2.0")):
        assert f"{name} ({reason}" in message
    assert "data.on_bad_image=skip" in message
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "difftrain", "train", *TINY, *BUCKETED, f"data.path={images}",
                           f"output_dir={run}"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "4 of 12 images" in proc.stderr
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_bad_images_stop_the_run_before_the_model_is_built(tmp_path, monkeypatch):
    """The data is indexed first (buckets sized by `size_multiple_of`, from the config alone): a bad folder
    costs seconds, not the model's imports and weights (minutes for a large base from disk)."""
    from difftrain.engine.run import run_training
    from difftrain.families.unet2d import UNet2DFamily

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the data was indexed")

    monkeypatch.setattr(UNet2DFamily, "__init__", refuse)
    with pytest.raises(UserError, match="4 of 12 images cannot be trained on"):
        run_training(tiny_config(tmp_path / "run", *BUCKETED, f"data.path={_bad_folder(tmp_path / 'images')}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_trains_without_bad_images_and_lists_them(tmp_path):
    from difftrain.engine.run import run_training

    images = _bad_folder(tmp_path / "images")
    run = tmp_path / "run"
    run_training(tiny_config(run, *BUCKETED, f"data.path={images}", "data.on_bad_image=skip", "trainer.max_steps=2"))
    skipped = sorted(line.split("\t")[0] for line in (run / "data" / "skipped.txt").read_text().splitlines())
    assert skipped == ["notanimage.jpg", "tiny.png", "truncated.png", "zero.png"]


def test_held_out_samples_never_train_and_feed_the_validation_loss(tmp_path):
    from difftrain.engine.run import run_training

    images = write_mixed(tmp_path / "images", n=24)
    run = tmp_path / "run"
    run_training(tiny_config(run, *BUCKETED, f"data.path={images}", "data.validation_split=4", "trainer.max_steps=2"))
    held = (run / "data" / "validation.txt").read_text().split()
    assert len(held) == 4
    data = _data(images, validation_split=4)
    assert [data.names[p] for p in data.validation] == held and not set(data.validation) & set(data.train)
    batch = data.validation_batch(64)
    assert batch["indices"].tolist() == data.validation and tuple(batch["pixels"].shape[-2:]) == (16, 16)


def test_index_scan_is_cached_by_name_size_and_mtime(tmp_path, monkeypatch):
    from difftrain.data import index as index_module

    images = write_mixed(tmp_path / "images")
    opened = []
    real = index_module.inspect_file
    monkeypatch.setattr(index_module, "inspect_file", lambda p: opened.append(p.name) or real(p))
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder

    def build():
        return build_imagefolder(ImageFolderDataConfig(path=str(images), resolution=16), resolve_interpolation_mode(
            "bilinear"), seed=0, size_multiple=2, cache_folder=tmp_path / "cache")

    a = build()
    assert len(opened) == 16
    b = build()
    assert len(opened) == 16 and a.index.sizes == b.index.sizes  # every header from the cached scan
    os.utime(images / "im003.png", ns=(5, 5))
    c = build()
    assert len(opened) == 32 and c.fingerprint != a.fingerprint  # one changed mtime: a new scan and key


def test_interrupted_cache_build_resumes_to_the_same_bytes(tmp_path):
    from types import SimpleNamespace

    from difftrain.data import cache as caches

    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                  wait_for_everyone=lambda: None)

    def compute(entries):
        return {e: {"x": torch.full((3,), float(e))} for e in entries}

    def killed_after_one(entries):
        if entries[0] > 0:
            raise KeyboardInterrupt  # the process dies while computing the second part
        return compute(entries)

    whole = caches.EntryCache(tmp_path / "a", "latents", {"k": 1}, 10, part_size=4)
    whole.open(accelerator, "ahead", compute, prune=False)
    broken = caches.EntryCache(tmp_path / "b", "latents", {"k": 1}, 10, part_size=4)
    with pytest.raises(KeyboardInterrupt):
        broken.open(accelerator, "ahead", killed_after_one, prune=False)
    assert broken.missing() == list(range(4, 10)) and not list(broken.folder.glob(".*.tmp"))
    done = []
    broken.open(accelerator, "ahead", lambda entries: done.append(entries[0]) or compute(entries), prune=False)
    assert done == [4, 8]  # only the missing entries
    names = [p.name for p in caches.part_files(whole.folder)]
    assert len(names) == 3 and names == [p.name for p in caches.part_files(broken.folder)]
    for name in names:  # named by their checksum: the same bytes
        assert (whole.folder / name).read_bytes() == (broken.folder / name).read_bytes()


@pytest.mark.slow
def test_sigkill_with_buckets_and_workers_then_resume_is_exact(tmp_path):
    images = write_mixed(tmp_path / "images", n=24)
    args = [*TINY, *BUCKETED, f"data.path={images}", "trainer.max_steps=30", "trainer.checkpoint_every=3",
            "trainer.num_workers=2", "trainer.checkpoints_total_limit=3"]

    def cli(*extra):
        # one OpenMP thread: the reference and the victim run side by side on a 2-core machine
        return subprocess.Popen([sys.executable, "-m", "difftrain", "train", *args, *extra],
                                env={**cli_env(), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref = cli(f"output_dir={tmp_path / 'ref'}")  # the uninterrupted run, beside the victim
    victim = cli(f"output_dir={tmp_path / 'run'}")
    deadline = time.time() + 240
    while not (tmp_path / "run" / "checkpoints" / "checkpoint-6").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)  # the DataLoader workers die with their parent
    victim.wait()
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    resumed = cli(f"output_dir={tmp_path / 'run'}", "resume=latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    _same_run(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(tmp_path / "images")


def test_hf_rows_are_indexed_without_decoding_and_streamed_by_workers(tmp_path):
    datasets = pytest.importorskip("datasets")
    import io

    from PIL import Image

    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema_t2i import HFDataConfig
    from difftrain.data.sources import build_hf

    cells = []
    for i, (h, w) in enumerate([(40, 30), (30, 40), (32, 32), (48, 24), (36, 36), (44, 33), (33, 44), (40, 40)]):
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), color=(i * 30, 100, 50)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    cells[5]["bytes"] = cells[5]["bytes"][:40]  # truncated
    ds = datasets.Dataset.from_dict({"image": cells, "text": [f"picture {i}" for i in range(8)]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    options = HFDataConfig(dataset=str(tmp_path / "ds"), resolution=16, buckets="auto", bucket_step=8,
                           random_flip=True, on_bad_image="skip")
    data = build_hf(options, resolve_interpolation_mode("bilinear"), seed=0, size_multiple=8)
    assert data.skipped == [("row 5", "truncated PNG (no IEND chunk)")] and len(data) == 7
    assert data.index.sizes[:2] == [(40, 30), (30, 40)]
    order = data.order(batch_size=1, grad_accum=1, world_size=1, seed=0)
    streams = [data.stream(order, 0, 6, workers, 2, False) for workers in (0, 2)]
    for step in range(6):
        a, b = (s.batch(step, 0) for s in streams)
        assert a["captions"] == b["captions"] and torch.equal(a["pixels"], b["pixels"])
    for s in streams:
        s.close()
