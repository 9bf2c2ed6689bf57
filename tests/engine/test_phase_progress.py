"""One display per phase (difftrain/progress.py): with trainer.progress=false a run's stdout is exactly one
line when each phase starts and one when it ends, beside the training loop's step lines, without a control
character; the lines are in train.log too; cache builds and class images use the same phases; a cached index
scan shows nothing; and off rank 0 nothing at all."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
from conftest import tiny_config
from PIL import Image

from difftrain import progress

STEP = re.compile(r"train step [1-4]/4  loss \d\.\d{4}  lr \d\.\d{2}e[-+]\d{2}  \d+\.\d it/s")


@pytest.fixture
def plain(monkeypatch):
    """Plain lines on this process, and a clock that never moves (the lines' seconds read 0.0 s)."""
    monkeypatch.setattr(progress, "_clock", lambda: 100.0)
    previous = progress.configure(plain=True, enabled=True)
    yield
    progress.configure(**previous)


def image_folder(root):
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 90, 0)).save(root / cls / f"{i}.png")
    return root


def test_a_plain_run_prints_one_line_per_phase_start_and_end(tmp_path, capsys, monkeypatch):
    from difftrain.engine.run import run_training

    monkeypatch.setattr(progress, "_clock", lambda: 100.0)
    images = image_folder(tmp_path / "images")
    cfg = tiny_config(tmp_path / "run", "data=imagefolder", f"data.path={images}", "data.resolution=8", "ema=none")
    assert cfg["trainer"]["progress"] is False
    from difftrain.engine.run_files import quiet_console

    quiet_console()  # a record from outside any run (an earlier test's index scan) is not this run's
    logging.getLogger(progress.LOGGER).info("index: start, 24 files")
    run_training(cfg)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line for line in lines if not line.startswith("train step ")] == [
        "index: start, 8 files", "index: done, 8 files in 0.0 s", "export final/: start", "export final/: done in 0.0 s"]
    assert lines[:2] == ["index: start, 8 files", "index: done, 8 files in 0.0 s"]  # the scan, before any step
    steps = lines[2:-2]
    assert len(steps) == 4 and all(STEP.fullmatch(line) for line in steps), steps
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out)  # no escape sequence, carriage return or cursor control
    log = (tmp_path / "run" / "train.log").read_text()
    assert [line.split(": ", 1)[1] for line in log.splitlines() if " difftrain.phase: " in line] == \
        [line for line in lines if not line.startswith("train step ")]
    assert progress._mode == {"plain": False, "enabled": True}  # the run's mode ends with the run


def test_a_cached_index_scan_shows_nothing(tmp_path, capsys, plain):
    from difftrain.config.schema_data import ImageFolderDataConfig
    from difftrain.data.index import index_imagefolder

    options = ImageFolderDataConfig(path=str(image_folder(tmp_path / "images")))
    first = index_imagefolder(options, tmp_path / "cache")
    assert capsys.readouterr().out == "index: start, 8 files\nindex: done, 8 files in 0.0 s\n"
    again = index_imagefolder(options, tmp_path / "cache")
    assert capsys.readouterr().out == "" and again.sizes == first.sizes == [(8, 8)] * 8


class OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True
    device = SimpleNamespace(type="cpu")

    def wait_for_everyone(self) -> None:
        pass


def test_a_cache_build_is_one_phase_and_a_complete_cache_none(tmp_path, capsys, plain):
    import torch

    from difftrain.data.cache import EntryCache

    def compute(entries):
        return {e: {"x": torch.full((2,), float(e))} for e in entries}

    cache = EntryCache(tmp_path, "latents", {"demo": 1}, count=5, part_size=2)
    reader = cache.open(OneProcess(), "ahead", compute, prune=False)
    assert capsys.readouterr().out == "cache latents: start, 5 entries\ncache latents: done, 5 entries in 0.0 s\n"
    assert reader.get(4, "x").tolist() == [4.0, 4.0]
    cache.open(OneProcess(), "ahead", compute, prune=False)
    assert capsys.readouterr().out == ""


def test_class_images_are_one_phase_counted_in_images(tmp_path, capsys, plain, monkeypatch):
    from difftrain.engine import class_images

    class Pipe:
        def __call__(self, prompt, num_inference_steps, height, width, generator):
            return SimpleNamespace(images=[Image.new("RGB", (width, height)) for _ in prompt])

    monkeypatch.setattr(class_images, "class_pipeline", lambda family, device: Pipe())
    entry = {"class_data_dir": str(tmp_path / "class"), "num_class_images": 6, "resolution": 8,
             "class_prompt": "a photo of a dog", "class_image_steps": 2}
    made = class_images.generate_class_images(entry, list(range(6)), None, OneProcess(), seed=0)
    assert made == 6 and len(list((tmp_path / "class").glob("class-*.png"))) == 6
    assert capsys.readouterr().out == "class images: start, 6 images\nclass images: done, 6 images in 0.0 s\n"


def test_a_phase_that_fails_says_where_it_stopped(capsys, plain):
    with pytest.raises(ValueError), progress.phase("cache text", 4, "shards") as tick:
        tick()
        raise ValueError("boom")
    assert capsys.readouterr().out == "cache text: start, 4 shards\ncache text: stopped after 1/4 shards in 0.0 s\n"


def test_other_ranks_and_empty_phases_show_nothing(capsys, plain):
    progress.configure(plain=True, enabled=False)  # what engine/run.py sets off rank 0
    with progress.phase("index", 10, "files") as tick:
        tick()
    progress.configure(plain=True, enabled=True)
    with progress.phase("cache latents", 0, "shards"), progress.phase("class images", 3, "images", enabled=False):
        pass
    assert capsys.readouterr().out == ""


def test_bars_write_no_plain_lines_and_nested_phases_no_second_bar(capsys, monkeypatch):
    monkeypatch.setattr(progress, "_clock", lambda: 100.0)
    assert progress._mode == {"plain": False, "enabled": True}  # outside a run (data-report): bars
    with progress.phase("export final/", None):
        with progress.phase("index", 2, "files") as tick:
            assert progress._active == ["export final/", "index"]
            tick(2)
    out = capsys.readouterr().out
    assert "index: start" not in out and "export final/: done" not in out and progress._active == []
