"""Shared fixtures: tiny configs composed through the real Hydra tree, and a clean accelerate state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one OpenMP thread per worker (2 cores, 2 workers)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# Modules whose tests share a session fixture's 2-process run (ddp_run, sdxl_ddp_run): one xdist worker.
SHARED_RUNS = {"test_fsdp2.py", "test_multiprocess.py", "test_multiprocess_data.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n 2 --dist loadgroup` (the README's command) each worker gets whole
    modules, so a module-scoped fixture (often a multi-process launch) runs once, and the modules in
    SHARED_RUNS go to one worker together, so their session-scoped runs are launched once, not once per worker.
    Serial runs ignore the marks."""
    for item in items:
        module = item.nodeid.split("::")[0]  # tests/engine/test_x.py
        item.add_marker(pytest.mark.xdist_group("shared_runs" if item.path.name in SHARED_RUNS else module))

# A tiny UNet and a short run: every engine test composes the real conf/ tree with these overrides.
TINY = [
    "model.block_out_channels=[8,16]",
    "model.down_block_types=[DownBlock2D,DownBlock2D]",
    "model.up_block_types=[UpBlock2D,UpBlock2D]",
    "model.norm_num_groups=4",
    "trainer.batch_size=8",
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.validate_every=4",  # = max_steps: one validation, at the end
    "trainer.progress=false",
    "lr_scheduler.warmup_steps=1",
    "validation.labels=[0,1]",
    "validation.num_per_label=1",
    "validation.inference_steps=2",
    "validation.loss_timesteps=2",
    "validation.loss_batch_size=4",
    "eval.enabled=false",
]
# TINY for the text-to-image families: without the digits UNet's model keys and its label validation
TINY_T2I = [o for o in TINY if not o.startswith(("model.", "validation.labels", "validation.num_per_label"))]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def tiny_config(output_dir: Path, *overrides: str) -> dict:
    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    return validate(compose_config([*TINY, f"output_dir={output_dir}", *overrides]))


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli_in_process(*argv: str) -> tuple[int, str]:
    """`difftrain ARGV` in this process: (exit status, everything printed); accelerate's state reset after."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from difftrain.cli.main import main
    from difftrain.engine.distributed import reset_accelerate_state

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    reset_accelerate_state()
    return code, out.getvalue()


# ---- the text-to-image tests' shared inputs (tests/t2i/tiny_pipes.py builds them) -----------------------------
@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    """The tiny SD1.5-style pipeline folder (built once per session)."""
    from tiny_pipes import pipeline_dir

    return pipeline_dir("sd15", tmp_path_factory.mktemp("pipes"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """8 captioned 40x48 images (metadata.jsonl); tests copy the folder before changing it."""
    from tiny_pipes import write_images

    return write_images(tmp_path_factory.mktemp("data") / "photos")


# ---- the multi-process tests' shared run (tests/distributed/dist_helpers.py launches it) ------------------------
@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """`accelerate launch --multi_gpu --num_processes 2 -m difftrain train` on TINY + dist_helpers.TWO (12 steps,
    checkpoints at 4, 8 and 12), with no output_dir: (root, [the run folder], console output). Each 2-process
    launch costs ~20 s of imports, so the DDP reference is launched once for test_multiprocess and test_fsdp2."""
    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from dist_helpers import TWO_PROC, launch

    root = tmp_path_factory.mktemp("ddp")
    proc = launch("accelerate", TWO_PROC, cwd=root)
    return root, list((root / "outputs").iterdir()), proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def sdxl_ddp_run(tmp_path_factory):
    """torchrun, 2 processes: dist_helpers.sdxl_lora_args on a tiny SDXL pipeline and 24 captioned mixed-aspect
    images -> (pipeline folder, image folder, run folder). test_multiprocess_data checks and resumes it;
    test_fsdp2 trains the same run with distributed=fsdp2 against it."""
    sys.path[:0] = [str(REPO / "tests" / d) for d in ("distributed", "t2i", "data")]
    from dist_helpers import launch, sdxl_lora_args
    from mixed_images import write_mixed
    from tiny_sdxl import build_sdxl

    root = tmp_path_factory.mktemp("sdxl_ddp")
    pipe, images = build_sdxl(root / "sdxl"), write_mixed(root / "images", n=24, captions=True)
    launch("torchrun", sdxl_lora_args(pipe, images, root / "run"), timeout=600)
    return pipe, images, root / "run"
