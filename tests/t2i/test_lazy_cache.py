"""data.cache_fill: caches filled lazily by the training step (the default) against ones filled ahead -- the
same bits, exact resume from a partly filled cache, damaged parts recomputed, a full disk survived, the frozen
text encoders released once every caption is cached, and the auto rule."""

from __future__ import annotations

import errno
import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny_pipes import cache_tensors, lora_file, losses, one_thread, t2i_config

from difftrain.data import cache as caches

one_thread = pytest.fixture(autouse=True)(one_thread)

ONE = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)


def test_resume_from_a_partly_filled_cache_is_exact(tmp_path, sd15, images, monkeypatch):
    """Stopped after step 3 of 6 (mid second epoch, half the flips never drawn), the run resumes with the
    entries it wrote, encodes the rest in its steps and ends bitwise as the uninterrupted run."""
    from difftrain.engine import trainer
    from difftrain.engine.run import run_training

    extra = ("lora=on", "data.cache_latents=true", "data.random_flip=true", "data.caption_dropout=0.3",
             "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.checkpoints_total_limit=null")
    full = tmp_path / "full"
    run_training(t2i_config(full, "sd15", sd15, images, *extra))
    real_step = trainer.Trainer.train_step

    def stop_after_three(self):
        if self.step == 3:
            raise KeyboardInterrupt  # the process stops (checkpoint-3 written, the caches flushed)
        return real_step(self)

    part = tmp_path / "part"
    monkeypatch.setattr(trainer.Trainer, "train_step", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_training(t2i_config(part, "sd15", sd15, images, *extra))
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    seen = cache_tensors(part, "latents")
    assert 0 < len(seen) < len(cache_tensors(full, "latents"))
    summary = run_training(t2i_config(part, "sd15", sd15, images, *extra, "resume=latest"))
    assert summary["resumed_from_step"] == 3
    assert losses(full) == losses(part)
    a, b = lora_file(full)[0], lora_file(part)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    every = cache_tensors(part, "latents")
    assert every.keys() == cache_tensors(full, "latents").keys() and all(torch.equal(seen[k], every[k]) for k in seen)
    for kind in ("latents", "text"):
        (folder,) = (part / "cache").glob(f"{kind}-*")
        assert caches.verify_cache(folder) is None


def test_damaged_part_is_deleted_and_recomputed_to_the_same_bytes(tmp_path, capsys):
    def compute(entries):
        return {e: {"x": torch.arange(4.0) + e} for e in entries}

    cache = caches.EntryCache(tmp_path, "latents", {"k": 1}, 6, part_size=4)
    cache.open(ONE, "ahead", compute, prune=False)
    parts = caches.part_files(cache.folder)
    assert len(parts) == 2 and caches.verify_cache(cache.folder) is None
    good = {p.name: p.read_bytes() for p in parts}
    data = bytearray(parts[0].read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor bytes: safetensors still opens it, the checksum does not match
    parts[0].write_bytes(bytes(data))
    assert caches.verify_cache(cache.folder) == f"{parts[0].name} does not match its checksum"
    assert cache.missing() == []  # the header is intact: only the checksum tells
    recomputed = []
    reader = cache.open(ONE, "ahead", lambda entries: recomputed.extend(entries) or compute(entries), prune=False)
    assert "had 1 damaged part file(s)" in capsys.readouterr().err
    from safetensors.torch import load

    assert sorted(recomputed) == sorted(int(k.split(".")[0]) for k in load(good[parts[0].name]))
    assert {p.name: p.read_bytes() for p in caches.part_files(cache.folder)} == good
    assert reader.get(5, "x").tolist() == [5.0, 6.0, 7.0, 8.0]
    algorithm, value = caches.bytes_checksum(b"torn").split(":")  # its checksum right, not a safetensors file
    (cache.folder / f"part-{algorithm}-{value}.safetensors").write_bytes(b"torn")
    assert "cannot be read" in caches.verify_cache(cache.folder)


def test_a_part_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, capsys, monkeypatch):
    cache = caches.EntryCache(tmp_path, "latents", {"k": 1}, 10, part_size=2)
    writer = caches.EntryWriter(cache, cache.reader())

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(caches.EntryCache, "write_part", full_disk)
    for entry in range(6):
        writer.add(entry, {"x": torch.zeros(1)})
    writer.flush()
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "No space left on device" in err and "data.cache_dir" in err
    assert writer.failed and writer.pending == {} and writer.lookup(0) is None


def test_lazy_text_fill_releases_the_encoders_once_every_caption_is_cached(tmp_path, sd15, images):
    """cache_fill=lazy: after prepare the text encoders stay (only the empty prompt is encoded); the step encodes
    each caption it meets, alone, to the bits of a fill ahead; once all are cached the encoders go."""
    from accelerate import Accelerator
    from test_t2i_data import _imagefolder

    from difftrain.config.schema_t2i import SD15ModelConfig
    from difftrain.data.samples import MicroBatchKey
    from difftrain.families.protocol import CacheOptions
    from difftrain.families.sd15 import SD15Family

    def family_and_data(fill, folder):
        family = SD15Family(SD15ModelConfig(pretrained=str(sd15), resolution=32))
        data = _imagefolder(images, resolution=32, random_flip=True)
        family.prepare(data, Accelerator(cpu=True), None, CacheOptions(latents=True, folder=folder, fill=fill), [])
        return family, data

    ahead, ahead_data = family_and_data("ahead", tmp_path / "a")
    lazy, data = family_and_data("lazy", tmp_path / "b")
    t2i = lazy.t2i
    assert t2i.frozen_encoders and not ahead.t2i.frozen_encoders
    assert t2i.text_cache.writer.pending.keys() == {0} and t2i.latent_cache.reader.present == 0
    first = data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2)))  # captions 0-2 of the 4
    assert "latent_fill" in first and "text_fill" in first
    x0, cond = lazy.inputs(first, "cpu")
    x0_ahead, cond_ahead = ahead.inputs(ahead_data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2))), "cpu")
    assert torch.equal(x0, x0_ahead) and torch.equal(cond["encoder_hidden_states"], cond_ahead["encoder_hidden_states"])
    assert t2i.frozen_encoders  # one caption still missing
    lazy.inputs(data.samples.__getitems__(MicroBatchKey(1, 0, 0, (3,))), "cpu")
    assert not t2i.frozen_encoders  # every caption known (written or pending): released
    lazy.flush_caches()
    again = data.samples.__getitems__(MicroBatchKey(0, 0, 0, (0, 1, 2)))
    assert "latent_fill" not in again and "text_fill" not in again  # now served from the parts
    assert torch.equal(lazy.inputs(again, "cpu")[0], x0)


def test_auto_fills_text_ahead_only_for_big_encoders():
    from difftrain.families.t2i_caches import text_fill_mode

    def t2i(*sizes):
        return SimpleNamespace(frozen_encoders={f"e{i}": torch.nn.Linear(n, 1024, device="meta")
                                                for i, n in enumerate(sizes)})

    clip_l = t2i(123_000_000 // 1024)  # ~0.5 GB of fp32 weights
    sdxl = t2i(123_000_000 // 1024, 695_000_000 // 1024)
    assert text_fill_mode(clip_l, "auto") == "lazy" and text_fill_mode(sdxl, "auto") == "ahead"
    assert text_fill_mode(sdxl, "lazy") == "lazy" and text_fill_mode(clip_l, "ahead") == "ahead"


def test_a_run_reusing_a_lazily_filled_cache_dir_trains_the_same(tmp_path, sd15, images):
    """A second run with the same data.cache_dir reads what the first wrote, computes only what it lacks and
    trains the same losses as the first and as a run without a shared cache."""
    from difftrain.engine.run import run_training

    shared = tmp_path / "shared"
    extra = ("ema=none", "data.cache_latents=true", "data.random_flip=true", "trainer.max_steps=3")
    run_training(t2i_config(tmp_path / "a", "sd15", sd15, images, *extra, f"data.cache_dir={shared}"))
    (folder,) = shared.glob("latents-*")
    before = {p.name for p in caches.part_files(folder)}
    run_training(t2i_config(tmp_path / "b", "sd15", sd15, images, *extra, f"data.cache_dir={shared}"))
    assert {p.name for p in caches.part_files(folder)} == before  # same steps: nothing new to encode
    run_training(t2i_config(tmp_path / "c", "sd15", sd15, images, *extra))
    assert losses(tmp_path / "a") == losses(tmp_path / "b") == losses(tmp_path / "c")
    shutil.rmtree(shared)
