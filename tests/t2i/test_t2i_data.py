"""Captions (metadata.jsonl, .txt, instance prompt), caption dropout, cache keys and reuse, and data=hf."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from tiny_pipes import losses, one_thread, pipeline_dir, t2i_config, write_images

from difftrain.data import cache as caches
from difftrain.data.captions import read_captions, require_captions
from difftrain.errors import UserError

one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    return pipeline_dir("sd15", tmp_path_factory.mktemp("pipes"))


def test_caption_sources_and_precedence(tmp_path):
    from difftrain.data.index import list_images

    root = tmp_path / "photos"
    write_images(root / "dogs", n=2, captions="metadata")  # dogs/metadata.jsonl: img0, img1
    write_images(root / "cats", n=2, captions="txt")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/img0.png", "text": "top level"}) + "\n"
                                         + json.dumps({"file_name": "dogs/img0.png", "text": "shadowed"}) + "\n")
    files = [f for f, _ in list_images(root)]
    captions = dict(zip((f.relative_to(root).as_posix() for f in files), read_captions(root, files)))
    assert captions == {"cats/img0.png": "top level", "cats/img1.png": "a red cat",
                        "dogs/img0.png": "a photo of a dog", "dogs/img1.png": "a red cat"}
    assert read_captions(root, files, instance_prompt="a photo of sks dog") == ["a photo of sks dog"] * 4
    assert read_captions(tmp_path / "none", []) is None


def test_bad_metadata_is_a_user_error(tmp_path):
    root = write_images(tmp_path / "photos", n=1, captions="none")
    (root / "metadata.jsonl").write_text('{"file_name": "img0.png", "caption": "x"}\n')
    with pytest.raises(UserError, match="needs the keys 'file_name' and 'text'"):
        read_captions(root, [root / "img0.png"])
    assert read_captions(root, [root / "img0.png"], caption_column="caption") == ["x"]
    (root / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        read_captions(root, [root / "img0.png"])


def _imagefolder(path, **options):
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder

    return build_imagefolder(ImageFolderDataConfig(path=str(path), **options), resolve_interpolation_mode("bilinear"),
                             seed=0, size_multiple=8)


def test_caption_dropout_and_flips_are_drawn_per_sample_and_epoch(tmp_path):
    from difftrain.data.samples import MicroBatchKey

    data = _imagefolder(write_images(tmp_path / "p", n=8), resolution=8, caption_dropout=0.5, random_flip=True)
    key = MicroBatchKey(0, 0, 0, tuple(range(8)))
    a, b = data.samples.__getitems__(key), data.samples.__getitems__(key)
    assert a["captions"] == b["captions"] and torch.equal(a["flips"], b["flips"]) and torch.equal(a["pixels"], b["pixels"])
    assert a["dropped"].any() and not a["dropped"].all()
    assert all((c == "") == bool(d) for c, d in zip(a["captions"], a["dropped"]))
    # a sample's draws depend on (seed, epoch, sample), not on the batch it is in
    alone = data.samples.__getitems__(MicroBatchKey(5, 1, 0, (3,)))
    assert alone["captions"] == a["captions"][3:4] and torch.equal(alone["pixels"][0], a["pixels"][3])
    epochs = [data.samples.__getitems__(MicroBatchKey(0, 0, e, tuple(range(8)))) for e in range(4)]
    assert len({tuple(x["flips"].tolist()) for x in epochs}) > 1  # new flips each epoch
    assert not data.validation_batch(8)["dropped"].any()  # the fixed validation samples: no dropout
    data.samples.table.rules[0] = dataclasses.replace(data.samples.table.rules[0], caption_dropout=1.0)
    assert set(data.samples.__getitems__(key)["captions"]) == {""}
    assert require_captions(data) == data.captions


def _cache_folders(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_cache_is_reused_and_invalidated_by_what_changes_it(tmp_path, sd15, monkeypatch):
    from difftrain.engine.run import run_training

    data = write_images(tmp_path / "photos", n=8)
    shared = tmp_path / "shared_cache"
    writes = []
    real = caches.EntryCache.write_part
    monkeypatch.setattr(caches.EntryCache, "write_part", lambda self, *a: writes.append(self.kind) or real(self, *a))

    def run(name, *extra):
        run_training(t2i_config(tmp_path / name, "sd15", sd15, data, "trainer.max_steps=1", "ema=none",
                                "data.cache_latents=true", f"data.cache_dir={shared}", *extra))
        return _cache_folders(shared)

    first = run("a")
    assert writes == ["latents", "text"] and len(first) == 2
    assert run("b") == first and len(writes) == 2  # same content: reused, not recomputed
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(run("c", "data.resolution=16")) == 3 and writes[2:] == ["latents"]  # new latents, same text
    assert len(run("d", "data.random_flip=true")) == 4 and writes[3:] == ["latents"]  # both flips: new latents
    assert len(run("e", "data.buckets=auto")) == 5 and writes[4:] == ["latents"]  # 40x48 images: a 56x64-ish bucket
    assert len(run("f", "data.instance_prompt=a photo of sks dog")) == 6 and writes[5:] == ["text"]  # new text only
    (data / "img0.png").touch()  # an image file changed (mtime): new latents
    os.utime(data / "img0.png", ns=(1, 1))
    assert len(run("g")) == 7 and writes[6:] == ["latents"]


def test_run_cache_folder_keeps_only_the_current_files(tmp_path, sd15):
    from difftrain.engine.run import run_training

    data = write_images(tmp_path / "photos", n=8)
    run = tmp_path / "run"
    ahead = ("trainer.max_steps=2", "ema=none", "data.cache_latents=true", "data.cache_fill=ahead")
    run_training(t2i_config(run, "sd15", sd15, data, *ahead))
    assert [f.split("-")[0] for f in sorted(p.name for p in (run / "cache").iterdir())] == ["index", "latents", "text"]
    # resuming reads the same files (nothing recomputed, nothing else written)
    before = {str(p): p.stat().st_mtime_ns for p in (run / "cache").rglob("*")}
    run_training(t2i_config(run, "sd15", sd15, data, *ahead[1:], "trainer.max_steps=3", "resume=latest"))
    assert {str(p): p.stat().st_mtime_ns for p in (run / "cache").rglob("*")} == before


def test_hf_dataset_from_save_to_disk(tmp_path, sd15):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    from tiny_pipes import CAPTIONS

    from difftrain.engine.run import run_training

    images = [Image.new("RGB", (36, 40), color=(i * 30, 100, 200 - i * 20)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"picture": images, "caption": CAPTIONS}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    hf = ("data=hf", f"data.dataset={tmp_path / 'ds'}", "data.image_column=picture", "data.caption_column=caption",
          "trainer.max_steps=1", "ema=none")
    summary = run_training(t2i_config(tmp_path / "run", "sd15", sd15, None, *hf, "data.cache_latents=true"))
    assert summary["steps"] == 1
    with pytest.raises(UserError, match="has no column 'photo'; its columns are picture, caption"):
        run_training(t2i_config(tmp_path / "bad", "sd15", sd15, None, *hf, "data.image_column=photo"))


def test_cached_rows_are_served_per_sample(tmp_path):
    """The data serves each sample's cached latent (its flip's) and its caption's text row (the empty prompt's
    when dropped), read lazily from the part files; what a lazy fill lacks comes as pixels for the step."""
    from types import SimpleNamespace

    from difftrain.data.samples import MicroBatchKey

    data = _imagefolder(write_images(tmp_path / "p", n=4), resolution=8, random_flip=True, caption_dropout=0.5)
    cache = caches.EntryCache(tmp_path / "c", "latents", {"x": 1}, 8, part_size=3)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                  wait_for_everyone=lambda: None)
    reader = cache.open(accelerator, "ahead", lambda entries: {e: {"mean_logvar": torch.full((2, 1, 1), e / 2)}
                                                             for e in entries}, prune=False)
    assert len(caches.part_files(cache.folder)) == 3 and reader.present == 8  # 8 entries, 3 per part
    text = caches.EntryCache(tmp_path / "c", "text", {"x": 1}, 3)
    text_reader = text.open(accelerator, "ahead", lambda entries: {e: {"e": torch.tensor([float(e)])} for e in entries},
                            False)
    served = data.samples.served
    served.latents, served.flips, served.text = reader, True, text_reader
    served.caption_rows, served.empty_row = [1, 2, 1, 2], 0
    batch = data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2, 3)))
    assert "pixels" not in batch
    expected = [i + (0.5 if f else 0.0) for i, f in enumerate(batch["flips"].tolist())]
    assert batch["latents"][:, 0, 0, 0].tolist() == expected
    assert batch["text"]["e"].flatten().tolist() == [0.0 if d else float(r)
                                                     for r, d in zip([1, 2, 1, 2], batch["dropped"].tolist())]
    # a lazy fill that has the entries of samples 0 and 1 only: samples 2 and 3 come as pixels at their cache
    # crop, flipped as drawn, for the step to encode; text rows it lacks come as None
    partial = caches.EntryCache(tmp_path / "c", "latents", {"x": 2}, 8)
    partial.write_part({e: {"mean_logvar": torch.full((2, 1, 1), e / 2)} for e in range(4)})
    text_part = caches.EntryCache(tmp_path / "c", "text", {"x": 2}, 3)
    text_part.write_part({0: {"e": torch.tensor([0.0])}})
    served.latents, served.text = partial.reader(), text_part.reader()
    lazy = data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2, 3)))
    fill, flips = lazy["latent_fill"], lazy["flips"].tolist()
    assert fill["present"].tolist() == [0, 1] and fill["missing"].tolist() == [2, 3]
    assert fill["entries"].tolist() == [2 * p + int(flips[p]) for p in (2, 3)]
    assert lazy["latents"][:, 0, 0, 0].tolist() == expected[:2]
    for j, p in enumerate((2, 3)):
        assert torch.equal(fill["pixels"][j], data.samples.pixels(p, (8, 8), data.samples.cache_crop(p), flips[p]))
    rows = [0 if d else r for r, d in zip([1, 2, 1, 2], lazy["dropped"].tolist())]
    assert "text" not in lazy and lazy["text_fill"]["rows"] == rows
    assert [g is None for g in lazy["text_fill"]["got"]] == [r != 0 for r in rows]


def test_family_prepare_takes_explicit_inputs(tmp_path, sd15):
    """SD15Family is a ModelFamily: prepare() gets data, accelerator, lora, caches and prompts (no config,
    no registry), builds named caches, and generates the validation grid from the request it makes."""
    from accelerate import Accelerator

    from difftrain import registry
    from difftrain.config.schema_t2i import SD15ModelConfig
    from difftrain.data.samples import MicroBatchKey
    from difftrain.families.protocol import CacheOptions, ModelFamily
    from difftrain.families.sd15 import SD15Family

    assert registry.get("model", "sd15").load() is SD15Family
    family = SD15Family(SD15ModelConfig(pretrained=str(sd15), resolution=32))
    assert isinstance(family, ModelFamily)
    assert family.size_multiple == 8 and SD15Family.size_multiple_of(SD15ModelConfig(pretrained=str(sd15))) == 8
    data = _imagefolder(write_images(tmp_path / "p", n=4), resolution=32, random_flip=True)
    schedule = family.training_schedule(registry.build("scheduler", {"name": "ddpm_v", "prediction_type": "v_prediction"}))
    assert schedule.prediction_type == "v_prediction" and not schedule.precondition_outputs
    caches_on = CacheOptions(latents=True, folder=tmp_path / "cache", fill="ahead", key_fields=(("center_crop", True),))
    family.prepare(data, Accelerator(cpu=True), None, caches_on, [])
    t2i = family.t2i
    assert t2i.latent_cache.reader.present == 8 and t2i.latent_cache.reader.names(7) == ["mean_logvar"]  # both flips
    assert t2i.text_cache.reader.names(0) == ["encoder_hidden_states"] and not t2i.frozen_encoders  # encoders released
    x0, cond = family.inputs(data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1))), "cpu",
                             torch.Generator().manual_seed(0))
    assert x0.shape == (2, 4, 16, 16) and cond["encoder_hidden_states"].shape == (2, 77, 8)
    request = family.validation_request({"num_images": 2, "steps": 2, "seed": 0, "guidance_scale": None}, data)
    assert request.prompts == ("a photo of a dog", "a red cat", "a blue dog", "a photo of a cat")  # first captions
    images, nrow = family.generate(family.module, schedule, request, "cpu")
    assert images.shape == (8, 3, 32, 32) and nrow == 2 and images.min() >= -1 and images.max() <= 1


def test_validation_samples_are_not_augmented(tmp_path):
    """The validation loss reads fixed samples: center crop, no flips, no dropout, whatever the options."""
    from difftrain.data.samples import MicroBatchKey, unit_range

    data = _imagefolder(write_images(tmp_path / "p", n=4), resolution=8, random_flip=True, center_crop=False,
                        caption_dropout=0.9)
    fixed = data.validation_batch(4)
    plain = _imagefolder(tmp_path / "p", resolution=8).samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2, 3)))
    assert torch.equal(fixed["pixels"], unit_range(plain["pixels"])) and fixed["flips"] is None
    assert not fixed["dropped"].any() and fixed["crop_offsets"].tolist() == plain["crop_offsets"].tolist()
