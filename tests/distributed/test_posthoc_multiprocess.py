"""ema=posthoc in a 2-process CPU (gloo) run: rank 0 alone writes the snapshots, every rank holds the same
profiles, the snapshot list is the 1-process run's, and a killed run resumes to the same snapshots bit for bit;
and under DeepSpeed ZeRO-3 (parameters partitioned), whose snapshots hold the full gathered weights.

Not compared: the snapshots' values against the 1-process run's. Both see the same global batches, but the
noise and timestep draws are seeded per rank (test_multiprocess.py's docstring), so the weights, and every
EMA of them, differ by training noise; no existing test claims more than a statistical match there.

Run as a script (`torchrun ... test_posthoc_multiprocess.py OUT OVERRIDES...`) this file is the worker:
it records which rank writes which snapshot and a digest of every rank's final shadows into OUT/rank<r>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from dist_helpers import ONE, TWO, killed_after, launch
from dist_helpers import TINY as TINY_OVERRIDES

pytestmark = pytest.mark.slow
POSTHOC = ["ema=posthoc", "ema.snapshot_every=5"]  # 12 steps: snapshots at 5, 10 and the last step, 12
STEPS = (5, 10, 12)


def _digest(tensors) -> str:
    """sha256 of the tensors' bytes, in order."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _snapshots(run: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """name -> (metadata, tensors as raw bytes), as tests/engine/test_posthoc_runs.py compares them."""
    import torch
    from safetensors import safe_open

    found = {}
    for path in sorted((run / "ema_snapshots").iterdir()):
        with safe_open(str(path), framework="pt") as f:
            found[path.name] = (f.metadata(), {k: f.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes()
                                               for k in f.keys()})  # noqa: SIM118
    return found


def worker(out: Path, overrides: list[str]) -> None:
    from conftest import tiny_config

    from difftrain.components import posthoc_ema
    from difftrain.engine.run import run_training

    rank = int(os.environ["RANK"])
    calls, emas = [], []
    real_write, real_bind = posthoc_ema.write_snapshot, posthoc_ema.PostHocEMA.bind_run

    def write(folder, step, profile, *args, **kwargs):
        calls.append([step, profile])
        return real_write(folder, step, profile, *args, **kwargs)

    def bind(self, *args, **kwargs):
        emas.append(self)
        return real_bind(self, *args, **kwargs)

    posthoc_ema.write_snapshot, posthoc_ema.PostHocEMA.bind_run = write, bind
    run_training(tiny_config(Path(overrides[0]), *overrides[1:]))
    (ema,) = emas
    report = {"writes": calls, "step": ema.optimization_step, "names": ema.param_names,
              "shadows": [_digest(shadow) for shadow in ema.shadows]}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _launch_worker(out: Path, run: Path, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launch("torchrun", [str(out), str(run), *TWO, *POSTHOC, *extra], script=Path(__file__))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc2")
    return root / "run", _launch_worker(root / "report", root / "run")


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    from conftest import tiny_config

    from difftrain.engine.run import run_training

    run = tmp_path_factory.mktemp("posthoc1") / "run"
    run_training(tiny_config(run, *ONE, *POSTHOC))
    return run


def test_rank0_alone_writes_and_every_rank_holds_the_same_profiles(two):
    import torch
    from safetensors.torch import load_file

    run, (rank0, rank1) = two
    assert rank0["writes"] == [[s, k] for s in STEPS for k in (0, 1)]
    assert rank1["writes"] == []  # rank 1 updates its profiles but never writes
    assert rank0["step"] == rank1["step"] == 12 and rank0["names"] == rank1["names"]
    assert rank0["shadows"] == rank1["shadows"]  # DDP keeps the weights, so the EMAs, identical on every rank
    last = [load_file(str(run / "ema_snapshots" / f"step-{12:09d}.profile-{k}.safetensors")) for k in (0, 1)]
    assert [_digest([s[n] for n in rank0["names"]]) for s in last] == rank0["shadows"]  # fp32: the shadows
    assert all(t.dtype == torch.float32 for t in last[0].values())


def test_snapshot_list_is_the_one_process_runs(two, one):
    run, _ = two
    a, b = _snapshots(run), _snapshots(one)
    assert sorted(a) == sorted(b) == [f"step-{s:09d}.profile-{k}.safetensors" for s in STEPS for k in (0, 1)]
    assert not [p for p in (run / "ema_snapshots").iterdir() if p.name.startswith(".")]  # no temporary left
    for name in a:
        meta_a, meta_b = dict(a[name][0]), dict(b[name][0])
        assert meta_a.pop("crc32") != meta_b.pop("crc32")  # other noise draws: other weights
        assert meta_a == meta_b and a[name][1].keys() == b[name][1].keys()


def test_two_process_resume_rewrites_the_snapshots_bitwise(two, tmp_path):
    """Killed after checkpoint 4 (snapshot 5 and later left behind, one of them truncated), resumed by 2
    processes: the same snapshot files, tensors and metadata equal bit for bit."""
    full, _ = two
    part = killed_after(full, tmp_path / "part", keep_step=4)
    victim = part / "ema_snapshots" / f"step-{10:09d}.profile-1.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    (part / "ema_snapshots" / ".step-000000012.profile-0.safetensors.tmp").write_bytes(b"half")
    rank0, rank1 = _launch_worker(tmp_path / "report", part, "resume=latest")
    assert rank0["writes"] == [[s, k] for s in STEPS for k in (0, 1)] and rank1["writes"] == []
    assert _snapshots(part) == _snapshots(full)


def test_zero3_snapshots_are_the_power_function_averages_of_the_gathered_weights(tmp_path):
    """ZeRO-3 on 2 CPU ranks, a snapshot after every step. Step 1 copies the weights (beta_1 = 0), so both
    profiles equal theta_1; at step t each profile is beta_t s_(t-1) + (1 - beta_t) theta_t, so solving each
    profile for theta_t must give the same weights, and at the last step the run's raw final weights. Profile 0
    is the run's EMA: final/unet. Tolerance 1e-5: float32 rounding, amplified by 1/(1 - beta_t) <= 1.05."""
    import torch
    from safetensors.torch import load_file

    from difftrain.components.posthoc_ema import beta, gamma_of_sigma_rel

    run = tmp_path / "run"
    launch("torchrun", [*TINY_OVERRIDES, "distributed=deepspeed_zero3", "distributed.stage3_param_persistence_threshold=0",
                        "trainer.batch_size=4", "trainer.max_steps=3", "trainer.checkpoint_every=0", "ema=posthoc",
                        "ema.snapshot_every=1", f"output_dir={run}"])
    snap = {(t, k): load_file(str(run / "ema_snapshots" / f"step-{t:09d}.profile-{k}.safetensors"))
            for t in (1, 2, 3) for k in (0, 1)}
    assert len(list((run / "ema_snapshots").iterdir())) == 6
    raw = load_file(str(run / "final" / "unet_raw" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in snap[1, 0].items()} == {k: v.shape for k, v in raw.items()}  # full, not shards
    assert all(v.numel() > 0 for v in raw.values())
    assert all(torch.equal(snap[1, 0][n], snap[1, 1][n]) for n in raw)
    gammas = [gamma_of_sigma_rel(s) for s in (0.05, 0.10)]
    for t in (2, 3):
        theta = [{n: (snap[t, k][n].double() - beta(g, t) * snap[t - 1, k][n].double()) / (1 - beta(g, t))
                  for n in raw} for k, g in enumerate(gammas)]
        assert max((theta[0][n] - theta[1][n]).abs().max().item() for n in raw) < 1e-5
    assert max((theta[0][n] - raw[n].double()).abs().max().item() for n in raw) < 1e-5
    assert any(not torch.equal(snap[3, 0][n], raw[n]) for n in raw)  # the EMA is not the raw weights
    ema = load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ema[n], snap[3, 0][n]) for n in raw)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
