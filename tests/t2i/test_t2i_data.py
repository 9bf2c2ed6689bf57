"""Captions (metadata.jsonl, .txt, instance prompt), caption dropout, cache keys and reuse, and data=hf."""

from __future__ import annotations

import json

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
    from difftrain.data.sources import _list_images

    root = tmp_path / "photos"
    write_images(root / "dogs", n=2, captions="metadata")  # dogs/metadata.jsonl: img0, img1
    write_images(root / "cats", n=2, captions="txt")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/img0.png", "text": "top level"}) + "\n"
                                         + json.dumps({"file_name": "dogs/img0.png", "text": "shadowed"}) + "\n")
    files = [f for f, _ in _list_images(root)]
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


def test_caption_dropout_is_drawn_from_the_step_generator(tmp_path):
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.sources import build_imagefolder

    options = ImageFolderDataConfig(path=str(write_images(tmp_path / "p", n=8)), resolution=8, caption_dropout=0.5,
                                    random_flip=True)
    data = build_imagefolder(options, resolve_interpolation_mode("bilinear"), seed=0)
    idx = torch.arange(8)
    a = data.batch(idx, torch.Generator().manual_seed(3))
    b = data.batch(idx, torch.Generator().manual_seed(3))
    assert a["captions"] == b["captions"] and torch.equal(a["flips"], b["flips"])
    assert a["dropped"].any() and not a["dropped"].all()
    assert all((c == "") == bool(d) for c, d in zip(a["captions"], a["dropped"]))
    assert not data.batch(idx)["dropped"].any()  # no generator (validation): no dropout
    data.caption_dropout = 1.0
    assert set(data.batch(idx, torch.Generator().manual_seed(0))["captions"]) == {""}
    assert require_captions(data) == data.captions


def test_cache_is_reused_and_invalidated_by_what_changes_it(tmp_path, sd15, monkeypatch):
    from difftrain.engine.run import run_training

    data = write_images(tmp_path / "photos", n=8)
    shared = tmp_path / "shared_cache"
    calls = []
    real = caches.encode_latent_parameters
    monkeypatch.setattr(caches, "encode_latent_parameters", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(name, *extra):
        run_training(t2i_config(tmp_path / name, "sd15", sd15, data, "trainer.max_steps=1", "ema=none",
                                "data.cache_latents=true", f"data.cache_dir={shared}", *extra))
        return sorted(p.name for p in shared.glob("*.safetensors"))

    first = run("a")
    assert len(calls) == 1 and len(first) == 2  # latents + text
    assert run("b") == first and len(calls) == 1  # same content: reused, not recomputed
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(run("c", "data.resolution=16")) == 3 and len(calls) == 2  # new latents, same text
    assert len(run("d", "data.random_flip=true")) == 4 and len(calls) == 3  # both flips: new latents
    assert len(run("e", "data.instance_prompt=a photo of sks dog")) == 5 and len(calls) == 3  # new text only
    metadata = caches._load(next(shared.glob("latents-*")), "wrong key")
    assert metadata is None  # a file is only read back under its own key


def test_run_cache_folder_keeps_only_the_current_files(tmp_path, sd15):
    from difftrain.engine.run import run_training

    data = write_images(tmp_path / "photos", n=8)
    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, data, "trainer.max_steps=2", "ema=none", "data.cache_latents=true"))
    files = sorted(p.name for p in (run / "cache").iterdir())
    assert [f.split("-")[0] for f in files] == ["latents", "text"]
    # resuming reads the same files (nothing recomputed, nothing else written)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "cache").iterdir()}
    run_training(t2i_config(run, "sd15", sd15, data, "trainer.max_steps=3", "ema=none", "data.cache_latents=true",
                            "resume=latest"))
    assert {p.name: p.stat().st_mtime_ns for p in (run / "cache").iterdir()} == before


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


def test_cache_objects_give_the_rows_of_a_batch():
    from pathlib import Path

    from difftrain.families.t2i import LatentCache, TextCache

    latents = LatentCache(torch.arange(8.0).view(8, 1), Path("latents.safetensors"))  # 4 images, both flips
    assert latents.rows(torch.tensor([0, 3]), None).flatten().tolist() == [0.0, 3.0]
    assert latents.rows(torch.tensor([0, 3]), torch.tensor([True, False])).flatten().tolist() == [4.0, 3.0]
    text = TextCache({"e": torch.tensor([[0.0], [1.0], [2.0]])}, torch.tensor([1, 2, 1]), 0, Path("text.safetensors"))
    rows = text.rows(torch.tensor([2, 1, 0]), torch.tensor([False, True, False]))
    assert rows["e"].flatten().tolist() == [1.0, 0.0, 1.0]  # a dropped caption gets the empty prompt's row


def test_family_prepare_takes_explicit_inputs(tmp_path, sd15):
    """SD15Family is a ModelFamily: prepare() gets data, accelerator, lora, caches and prompts (no config,
    no registry), builds named caches, and generates the validation grid from the request it makes."""
    from accelerate import Accelerator

    from difftrain import registry
    from difftrain.components.interpolation import resolve_interpolation_mode
    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.config.schema_t2i import SD15ModelConfig
    from difftrain.data.sources import build_imagefolder
    from difftrain.families.protocol import CacheOptions, ModelFamily
    from difftrain.families.sd15 import SD15Family
    from difftrain.families.t2i import LatentCache, TextCache

    assert registry.get("model", "sd15").load() is SD15Family
    family = SD15Family(SD15ModelConfig(pretrained=str(sd15), resolution=32))
    assert isinstance(family, ModelFamily)
    options = ImageFolderDataConfig(path=str(write_images(tmp_path / "p", n=4)), resolution=32, random_flip=True)
    data = build_imagefolder(options, resolve_interpolation_mode("bilinear"), seed=0)
    schedule = family.training_schedule(registry.build("scheduler", {"name": "ddpm_v", "prediction_type": "v_prediction"}))
    assert schedule.prediction_type == "v_prediction" and not schedule.precondition_outputs
    caches_on = CacheOptions(latents=True, folder=tmp_path / "cache", batch_size=2, key_fields=(("center_crop", True),))
    family.prepare(data, Accelerator(cpu=True), None, caches_on, [])
    t2i = family.t2i
    assert isinstance(t2i.latent_cache, LatentCache) and t2i.latent_cache.parameters.shape[0] == 8  # both flips
    assert isinstance(t2i.text_cache, TextCache) and not t2i.frozen_encoders  # all embedded: encoders released
    x0, cond = family.inputs(data.batch(torch.arange(2), torch.Generator().manual_seed(0)), "cpu")
    assert x0.shape == (2, 4, 16, 16) and cond["encoder_hidden_states"].shape == (2, 77, 8)
    request = family.validation_request({"num_images": 2, "steps": 2, "seed": 0, "guidance_scale": None}, data)
    assert request.prompts == ("a photo of a dog", "a red cat", "a blue dog", "a photo of a cat")  # first captions
    images, nrow = family.generate(family.module, schedule, request, "cpu")
    assert images.shape == (8, 3, 32, 32) and nrow == 2 and images.min() >= -1 and images.max() <= 1


def test_batches_without_a_generator_are_not_augmented():
    """The validation loss reads fixed samples: no flips (they used to come from the global RNG)."""
    import torch

    from difftrain.data.sources import ImageDataset

    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    data = ImageDataset(images, None, None, random_flip=True)
    for seed in range(3):
        torch.manual_seed(seed)
        batch = data.batch(torch.arange(2))
        assert batch["flips"] is None and torch.equal(batch["pixels"], images)
    flipped = data.batch(torch.arange(2), torch.Generator().manual_seed(0))
    assert flipped["flips"] is not None
    expected = torch.where(flipped["flips"].view(-1, 1, 1, 1), images.flip(-1), images)
    assert torch.equal(flipped["pixels"], expected)
