"""The bad-input suite: every case is a command with a wrong value, combination, path, image, caption file,
checkpoint, cache, signal or fault; each must exit with its code and a message holding its words, print no
Python traceback, change nothing that existed before (checksums of every file of the run folder) and leave
nothing half-written (no `.checkpoint-*.tmp` folder, no temporary file)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_in_process

sys.path.insert(0, str(REPO / "tests" / "data"))
from mixed_images import write_mixed  # noqa: E402

RUN = [*TINY, "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.checkpoints_total_limit=null"]


cli = cli_in_process  # `difftrain ARGV` in this process: (exit status, everything printed)


def tree_sums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints 1 and 2 (copied for every case that needs one)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code, out = cli("train", *RUN, f"output_dir={run}")
    assert code == 0, out
    return run


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _images(tmp: Path, kind: str) -> Path:
    folder = write_mixed(tmp / "images", n=8)
    if kind == "zero":
        (folder / "zero.png").write_bytes(b"")
    elif kind == "truncated":
        good = (folder / "im000.png").read_bytes()
        (folder / "cut.png").write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        (folder / "x.jpg").write_bytes(b"not an image")
    elif kind == "tiny":
        from PIL import Image

        Image.new("RGB", (3, 3)).save(folder / "tiny.png")
    elif kind == "badmask":
        from PIL import Image

        Image.new("L", (3, 3)).save(folder / "im000_mask.png")
    elif kind == "metadata":
        (folder / "metadata.jsonl").write_text("{broken\n")
    elif kind == "mixed":
        (folder / "loose.png").write_bytes((folder / "im000.png").read_bytes())
        (folder / "cls").mkdir()
        shutil.move(folder / "im001.png", folder / "cls" / "im001.png")
    return folder


IMAGES = ["data=imagefolder", "data.resolution=16", "data.buckets=auto", "data.bucket_step=8",
          "trainer.batch_size=2", "model.num_class_embeds=null", "validation.labels=[0]"]

# (id, argv with placeholders, exit status, words the output must hold)
# placeholders: {run} a copy of the finished run, {new} a fresh run folder, {tmp} the case folder,
# {images:<kind>} an image folder with one bad kind of file
CASES = [
    ("decay-above-1", ["train", "ema.decay=1.5"], 2, ["ema.decay=1.5 must be <= 1"]),
    ("batch-size-0", ["train", "trainer.batch_size=0"], 2, ["trainer.batch_size", ">= 1"]),
    ("steps-not-int", ["train", "trainer.max_steps=abc"], 2, ["trainer.max_steps"]),
    ("unknown-key", ["train", "+trainer.bogus=1"], 2, ["trainer.bogus"]),
    ("unknown-option", ["train", "scheduler=nope"], 2, ["scheduler", "nope"]),
    ("unknown-weighting", ["train", "weighting_scheme=nope"], 2, ["weighting_scheme", "nope"]),
    ("warmup-too-long", ["train", "lr_scheduler.warmup_steps=99999"], 2, ["exceeds trainer.max_steps"]),
    ("warmup-not-whole", ["train", "lr_scheduler.warmup_steps=2.5"], 2, ["give a fraction"]),
    ("fp16-on-cpu", ["train", "trainer.mixed_precision=fp16", "trainer.cpu=true"], 2, ["fp16 needs a GPU"]),
    ("betas-one", ["train", "optimizer.betas=[0.9]"], 2, ["optimizer.betas must be two numbers"]),
    ("beta-order", ["train", "scheduler.beta_start=0.02", "scheduler.beta_end=0.01"], 2, ["beta"]),
    ("minutes-zero", ["train", "trainer.checkpoint_every_minutes=0"], 2, ["checkpoint_every_minutes", "> 0"]),
    ("workers-negative", ["train", "trainer.num_workers=-1"], 2, ["trainer.num_workers", ">= 0"]),
    ("bad-image-policy", ["train", "data=imagefolder", "data.path={tmp}", "data.on_bad_image=ignore"], 2,
     ["data.on_bad_image", "error, skip"]),
    ("buckets-word", ["train", "data=imagefolder", "data.path={tmp}", "data.buckets=square"], 2,
     ["data.buckets must be none, auto"]),
    ("split-fraction", ["train", "data.validation_split=2.5"], 2, ["data.validation_split=2.5"]),
    ("sample-size", ["train", "model.sample_size=7"], 2, ["model.sample_size (7)"]),
    ("lora-on-unet2d", ["train", "lora=on"], 2, ["lora"]),
    ("sd15-no-pretrained", ["train", "model=sd15"], 2, ["model.pretrained is required"]),
    ("pretrained-is-file", ["train", "model=sd15", "model.pretrained={tmp}/file.txt"], 2, ["is not a folder"]),
    ("no-data-path", ["train", "data=imagefolder"], 2, ["data.path is required"]),
    ("data-path-missing", ["train", "data=imagefolder", "data.path={tmp}/nothing"], 2, ["is not a folder"]),
    ("resume-no-output", ["train", "resume=latest"], 2, ["resume needs output_dir"]),
    ("sweep-bad-value", ["train", "-m", "ema.decay=0.9,1.5"], 2, ["ema.decay=1.5 must be <= 1"]),
    ("unknown-command", ["fly"], 2, ["unknown command 'fly'"]),
    ("output-under-file", ["train", *RUN, "output_dir={tmp}/file.txt/run"], 2, ["cannot be created or written"]),
    ("output-in-proc", ["train", *RUN, "output_dir=/proc/difftrain-run"], 2, ["cannot be created or written"]),
    ("existing-run", ["train", *RUN, "output_dir={run}"], 2, ["already holds a run"]),
    ("zero-byte-image", ["train", *RUN, *IMAGES, "data.path={images:zero}", "output_dir={new}"], 2,
     ["1 of 9 images cannot be trained on", "zero.png (zero-byte file)"]),
    ("truncated-image", ["train", *RUN, *IMAGES, "data.path={images:truncated}", "output_dir={new}"], 2,
     ["cut.png (truncated PNG"]),
    ("garbage-image", ["train", *RUN, *IMAGES, "data.path={images:garbage}", "output_dir={new}"], 2,
     ["x.jpg (unreadable: not an image format PIL can open)"]),
    ("too-small-image", ["train", *RUN, *IMAGES, "data.path={images:tiny}", "output_dir={new}"], 2,
     ["tiny.png (too small: 3x3"]),
    ("mask-wrong-size", ["train", *RUN, *IMAGES, "data.masks=files", "data.path={images:badmask}", "output_dir={new}"],
     2, ["1 of 8 images cannot be trained on", "im000.png (its mask im000_mask.png is 3x3 but the image is"]),
    ("bad-source-entry", ["train", "data=sources", "data.sources=[{pth: {tmp}}]", "model.num_class_embeds=null"], 2,
     ["data.sources[0].pth is not a key of imagefolder sources", "data=sources trains text-to-image models"]),
    ("broken-metadata", ["train", *RUN, *IMAGES, "data.path={images:metadata}", "output_dir={new}"], 2,
     ["metadata.jsonl line 1 is not valid JSON"]),
    ("mixed-classes", ["train", *RUN, *IMAGES, "data.path={images:mixed}", "output_dir={new}"], 2,
     ["mixes class subfolders with loose images"]),
    ("report-bad-images", ["data-report", *IMAGES, "data.path={images:zero}"], 2,
     ["skipped: zero.png: zero-byte file", "cannot be trained on"]),
    ("resume-missing-path", ["train", *RUN, "output_dir={run}", "resume={tmp}/nothing"], 2,
     ["is not a checkpoint folder"]),
    ("resume-flipped-bits", ["train", *RUN, "output_dir={run}", "resume={run}/checkpoints/checkpoint-1"], 2,
     ["does not match its checksum"]),
    ("resume-truncated", ["train", *RUN, "output_dir={run}", "resume={run}/checkpoints/checkpoint-2"], 2,
     ["is incomplete or corrupt"]),
    ("resume-changed-config", ["train", *RUN, "ema.decay=0.5", "output_dir={run}", "resume=latest"], 2,
     ["resume would silently change the run", "ema.decay"]),
    ("resume-other-batch", ["train", *RUN, "trainer.batch_size=4", "output_dir={run}", "resume=latest"], 2,
     ["trainer.batch_size"]),
    ("verify-not-a-run", ["verify", "{tmp}/nothing"], 2, ["is not a folder"]),
    ("verify-empty", ["verify", "{tmp}"], 2, ["has no checkpoints and no caches"]),
    ("verify-damaged", ["verify", "{run}"], 1, ["checkpoint-1", "does not match its checksum"]),
    ("sample-not-a-run", ["sample", "{tmp}/nothing"], 2, ["nothing"]),
    ("disk-full", ["train", *RUN, "output_dir={new}"], 2, ["writing checkpoint-2", "the disk is full", "intact",
                                                            "checkpoint-1", "resume=latest"]),
    ("read-only-disk", ["train", *RUN, "output_dir={new}"], 2, ["the file system is read-only"]),
    ("offline-hub-id", ["train", "model=sd15", "model.pretrained=org/not-cached", "data=imagefolder",
                        "data.path={images:plain}", "output_dir={new}"], 2,
     ["cannot be reached", "not in the local Hugging Face cache"]),
    ("nan-before-checkpoint", ["train", *RUN, "trainer.checkpoint_every=0", "output_dir={new}"], 3,
     ["the loss became nan at step 2", "no checkpoint had been written yet"]),
    ("nan-after-checkpoint", ["train", *RUN, "output_dir={new}"], 3,
     ["the loss became nan at step 2", "checkpoint-1, is kept"]),
    ("sigterm-mid-run", ["train", *TINY, "trainer.max_steps=6", "trainer.checkpoint_every=0", "output_dir={new}"], 75,
     ["SIGTERM received: stopped after step 2 and wrote checkpoint-2", "resume=latest"]),
]


def _fill(arg: str, values: dict) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", str(value))
    return arg


@pytest.mark.parametrize(("case", "argv", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, status, words, tmp_path, finished, monkeypatch):
    (tmp_path / "file.txt").write_text("a file")
    values = {"tmp": tmp_path, "new": tmp_path / "new"}
    if any("{run}" in a for a in argv):
        values["run"] = tmp_path / "run"
        shutil.copytree(finished, values["run"])
        _flip_bytes(values["run"] / "checkpoints" / "checkpoint-1" / "model.safetensors")
        with open(values["run"] / "checkpoints" / "checkpoint-2" / "optimizer.pt", "r+b") as f:
            f.truncate(100) if case == "resume-truncated" else None
    for kind in ("plain", "zero", "truncated", "garbage", "tiny", "metadata", "mixed", "badmask"):
        if any(f"{{images:{kind}}}" in a for a in argv):
            values[f"images:{kind}"] = _images(tmp_path, kind)
    _inject_fault(case, monkeypatch)
    argv = [_fill(a, values) for a in argv]
    before = {name: tree_sums(Path(path)) for name, path in values.items() if name in ("run",)}
    started = time.perf_counter()
    code, out = cli(*argv)
    elapsed = time.perf_counter() - started
    assert code == status, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    flat = " ".join(out.split())
    for word in words:
        assert word in flat, f"{word!r} not in: {flat[-2000:]}"
    for name, sums in before.items():
        assert tree_sums(Path(values[name])) == sums  # nothing that existed was changed
    for folder in (tmp_path / "new", values.get("run")):
        if folder is not None and folder.exists():
            assert not list(folder.rglob(".checkpoint-*")) and not list(folder.rglob("*.tmp"))
    if case == "offline-hub-id":
        assert elapsed < 5
    if case in ("disk-full", "read-only-disk"):  # the earlier checkpoint is complete and verifies
        from difftrain.engine import checkpoint as ckpt

        kept = ckpt.complete_checkpoints(tmp_path / "new" / "checkpoints")
        assert [s for s, _ in kept] == [1] and ckpt.verify(kept[0][1]) is None
    if case == "sigterm-mid-run":
        from difftrain.engine import checkpoint as ckpt

        assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "new" / "checkpoints")] == [2]
        assert not (tmp_path / "new" / "final").exists()


def _inject_fault(case: str, monkeypatch) -> None:
    from difftrain.engine import checkpoint as ckpt

    if case in ("disk-full", "read-only-disk"):
        code = errno.ENOSPC if case == "disk-full" else errno.EROFS
        real, calls = ckpt.write_torch, []

        def failing(tmp, name, obj):
            if name == "optimizer.pt" and ".checkpoint-2" in str(tmp):
                real(tmp, name, obj)  # half the checkpoint is on disk when the write fails
                calls.append(1)
                raise OSError(code, os.strerror(code), str(tmp / "lr_scheduler.pt"))
            return real(tmp, name, obj)

        monkeypatch.setattr(ckpt, "write_torch", failing)
    elif case == "offline-hub-id":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case.startswith("nan-"):
        from difftrain.engine.trainer import Trainer

        real_loss = Trainer.compute_loss
        monkeypatch.setattr(Trainer, "compute_loss", lambda self, *a: real_loss(self, *a) * (
            float("nan") if self.step == 1 else 1.0))
    elif case == "sigterm-mid-run":
        from difftrain.engine.trainer import Trainer

        real_step = Trainer.train_step

        def step_then_signal(self):
            result = real_step(self)
            if self.step == 1:  # during step 2 (0-based step 1): the run finishes it, then stops
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        monkeypatch.setattr(Trainer, "train_step", step_then_signal)


def test_the_suite_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_resume_after_sigterm_is_bitwise_exact(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from difftrain.engine.trainer import Trainer

    args = [*TINY, "trainer.max_steps=6", "trainer.checkpoint_every=0", "data.random_flip=true"]
    assert cli("train", *args, f"output_dir={tmp_path / 'ref'}")[0] == 0
    real_step = Trainer.train_step

    def step_then_signal(self):
        result = real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal during the stop changes nothing
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    code, out = cli("train", *args, f"output_dir={tmp_path / 'run'}")
    assert code == 75 and "SIGUSR1 received: stopped after step 3" in out
    monkeypatch.setattr(Trainer, "train_step", real_step)
    code, out = cli("train", *args, f"output_dir={tmp_path / 'run'}", "resume=latest")
    assert code == 0, out

    def rows(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "ref")] == [(r["step"], r["loss"]) for r in rows(tmp_path / "run")]
    a = load_file(str(tmp_path / "ref" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_latest_skips_a_damaged_checkpoint_with_a_warning(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _flip_bytes(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    code, out = cli("train", *[a for a in RUN if not a.startswith("trainer.max_steps")], "trainer.max_steps=3",
                    f"output_dir={run}", "resume=latest")
    assert code == 0, out
    flat = " ".join(out.split())
    assert "checkpoint-2' fails verification (model.safetensors does not match its checksum" in flat
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 1


def test_slurm_requeue_resumes_and_a_preempted_job_asks_for_requeue(tmp_path, finished, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    code, out = cli("train", *[a for a in RUN if not a.startswith("trainer.max_steps")], "trainer.max_steps=3",
                    f"output_dir={run}")
    assert code == 0 and "this SLURM job was requeued" in out
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    from difftrain.engine.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_signal(self):
        result = real_step(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    code, out = cli("train", *TINY, f"output_dir={tmp_path / 'job'}")
    assert code == 75 and "SLURM job 4242 requeued" in " ".join(out.split())
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


def test_a_short_run_needs_one_override():
    """The warm-up is a fraction of the run by default (0.05): `trainer.max_steps=20` alone is valid."""
    from difftrain.cli.train import compose_config
    from difftrain.config.rule_helpers import warmup_steps
    from difftrain.config.validate import validate

    cfg = validate(compose_config(["trainer.max_steps=20"]))
    assert warmup_steps(cfg["lr_scheduler"]["warmup_steps"], 20) == 1
    assert warmup_steps(0.05, 2000) == 100  # the default run keeps its 100 warm-up steps


def test_a_real_full_disk_keeps_the_earlier_checkpoint(tmp_path):
    """A real tmpfs of 1.4 MB (root only; skipped elsewhere): checkpoint-1 (~0.8 MB) fits, checkpoint-2 does not."""
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code, out = cli("train", *RUN, "trainer.max_steps=3", f"output_dir={disk / 'run'}")
        flat = " ".join(out.split())
        assert code == 2 and "Traceback" not in out, out[-3000:]
        assert "writing checkpoint-2" in flat and "the disk is full" in flat and "checkpoint-1" in flat
        from difftrain.engine import checkpoint as ckpt

        kept = ckpt.complete_checkpoints(disk / "run" / "checkpoints")
        assert [s for s, _ in kept] == [1] and ckpt.verify(kept[0][1]) is None
        assert not list((disk / "run").rglob(".checkpoint-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_timed_checkpoints(tmp_path):
    code, out = cli("train", *TINY, "trainer.max_steps=3", "trainer.checkpoint_every=0",
                    "trainer.checkpoints_total_limit=null", "trainer.checkpoint_every_minutes=0.000001",
                    f"output_dir={tmp_path / 'run'}")
    assert code == 0, out
    from difftrain.engine import checkpoint as ckpt

    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")] == [1, 2, 3]


def test_a_cached_hub_model_resolves_offline(tmp_path, monkeypatch):
    """Offline, a hub id already in the local Hugging Face cache resolves to its snapshot folder."""
    from huggingface_hub import constants

    from difftrain.families.loading import resolve_source

    snapshot = tmp_path / "hub" / "models--difftrain--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "hub" / "models--difftrain--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--difftrain--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    source = resolve_source("difftrain/tiny")
    assert source.local and Path(source.location) == snapshot and source.pretrained == "difftrain/tiny"
    assert time.perf_counter() - started < 5
