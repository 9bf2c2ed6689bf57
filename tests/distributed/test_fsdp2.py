"""distributed=fsdp2 on two CPU processes (gloo): the same run as DDP, exact resume, plain diffusers exports.

Tolerance against DDP: both engines see the same batches, draws, initial weights and LR schedule; FSDP2
reduce-scatters the gradients where DDP all-reduces them, and computes the clipping norm from shards. Measured
on this config (tiny UNet, 2 x batch 4, 12 steps, clipping at 1.0, EMA on; the DDP run is tests/conftest.py's
`ddp_run`, shared with test_multiprocess.py): 6 of 12 losses bitwise equal and the others within 1.8e-7
relative, grad_norm within 1.1e-7 relative, final weights within 2.1e-5 absolute (Adam amplifies the last-bit
differences of the clipping factor). The test allows 1e-5 relative on losses and grad norms and 1e-3 absolute
on weights.
Resume is exact: every logged number and every weight equal the uninterrupted fsdp2 run.
The text-to-image case (tiny SDXL, lora=on, buckets, caches, 2 x batch 2, 4 steps, EMA on; the DDP run is
tests/conftest.py's `sdxl_ddp_run`, shared with test_multiprocess_data.py) measured every loss bitwise equal,
grad_norm within 2.6e-7 relative and the LoRA files (EMA and raw) within 1.2e-7 absolute; it allows 1e-5 relative and 1e-4
absolute (one step moves a weight by up to the learning rate, 2e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import REPO, TWO, TWO_PROC, killed_after, launch, train_rows
from safetensors.torch import load_file

from difftrain.engine import checkpoint as ckpt

pytestmark = pytest.mark.slow
FSDP2 = [*TWO_PROC, "distributed=fsdp2"]  # 12 steps, checkpoints at 4, 8 and 12: the shared ddp_run's
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-3


def _weights(run: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / sub / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """The documented command: `accelerate launch --num_processes 2 -m difftrain train distributed=fsdp2`
    (plus --multi_gpu, accelerate's multi-process path on a machine without GPUs)."""
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    launch("accelerate", [*FSDP2, f"output_dir={run}"])
    return run


def test_fsdp2_matches_ddp(fsdp2_run, ddp_run):
    ddp_run = ddp_run[1][0]  # tests/conftest.py: the DDP run test_multiprocess.py checks
    fsdp, ddp = train_rows(fsdp2_run), train_rows(ddp_run)
    assert [r["step"] for r in fsdp] == list(range(1, 13))
    assert [r["lr"] for r in fsdp] == [r["lr"] for r in ddp]
    assert [r["global_batch"] for r in fsdp] == [8] * 12
    for a, b in zip(fsdp, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL)
    for sub in ("unet", "unet_raw"):  # EMA (gathered from the shards every step) and the trained weights
        wf, wd = _weights(fsdp2_run, sub), _weights(ddp_run, sub)
        assert wf.keys() == wd.keys()
        worst = max(float((wf[k] - wd[k]).abs().max()) for k in wf)
        print(f"final/{sub}: largest |fsdp2 - ddp| = {worst:.2e}")
        assert worst <= WEIGHT_ATOL


def test_checkpoints_hold_every_rank_s_shards(fsdp2_run):
    path = fsdp2_run / "checkpoints" / "checkpoint-12"
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp", "model.safetensors", "ema.safetensors",
            "lr_scheduler.pt", "trainer_state.json"} <= set(files)
    assert "optimizer.pt" not in files  # the optimizer state lives in the shards
    assert json.loads((path / "trainer_state.json").read_text())["engine"] == "fsdp2"
    assert ckpt.is_complete(path) and ckpt.verify(path) is None  # sizes and checksums of every shard
    weights = ckpt.read_tensors(path, "model.safetensors")  # full, plain tensors = the trained weights
    raw = _weights(fsdp2_run, "unet_raw")
    assert weights.keys() == raw.keys() and all(torch.equal(weights[k], raw[k]) for k in raw)
    ema = ckpt.read_tensors(path, "ema.safetensors")
    exported = _weights(fsdp2_run, "unet")
    assert all(torch.equal(ema[k], exported[k]) for k in ema)  # final/unet holds the EMA weights


def test_resume_is_bitwise_exact(fsdp2_run, tmp_path):
    """Killed after checkpoint 4, resumed with torchrun: every logged number and weight equal."""
    part = killed_after(fsdp2_run, tmp_path / "part", keep_step=4)
    launch("torchrun", [*FSDP2, f"output_dir={part}", "resume=latest"])
    keys = ("step", "loss", "lr", "grad_norm", "global_batch")
    assert [[r[k] for k in keys] for r in train_rows(part)] == [[r[k] for k in keys] for r in train_rows(fsdp2_run)]
    for sub in ("unet", "unet_raw"):
        a, b = _weights(fsdp2_run, sub), _weights(part, sub)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_is_a_plain_diffusers_model(fsdp2_run):
    from diffusers import UNet2DModel

    for sub in ("unet", "unet_raw"):
        model = UNet2DModel.from_pretrained(str(fsdp2_run / "final" / sub))
        state, saved = model.state_dict(), _weights(fsdp2_run, sub)
        assert not any(("_fsdp" in k or "_orig_mod" in k or "_checkpoint_wrapped" in k) for k in saved)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        assert all(type(t) is torch.Tensor for t in state.values())  # no DTensor anywhere


def test_fsdp2_checkpoint_cannot_be_resumed_with_ddp(fsdp2_run, tmp_path):
    from conftest import tiny_config

    from difftrain.engine.run import run_training
    from difftrain.errors import UserError

    part = killed_after(fsdp2_run, tmp_path / "part", keep_step=4)
    with pytest.raises(UserError, match="distributed.name: 'fsdp2' -> 'ddp'"):
        run_training(tiny_config(part, *TWO, "resume=latest"))


def _unordered(meta: dict) -> dict:
    """LoRA adapter metadata with its lists sorted (peft keeps target_modules as a set: hash order)."""
    return {k: sorted(v) if isinstance(v, list) else v for k, v in meta.items()}


def test_sdxl_lora_with_caches_matches_ddp_and_loads_with_load_lora_weights(sdxl_ddp_run, tmp_path):
    """model=sdxl lora=on with buckets, a DataLoader worker, lazily filled caches, EMA, checkpoints and a
    validation: the trained module is the family's T2IModule, whose `denoiser` gives the block units and whose
    eval copy is rebuilt around a plain UNet with the same adapters. The same losses as the DDP run
    (tests/conftest.py `sdxl_ddp_run`), the same LoRA files, and final/ loads with load_lora_weights."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "t2i"))
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from dist_helpers import sdxl_lora_args
    from peft.utils import get_peft_model_state_dict
    from tiny_pipes import lora_file

    pipe, images, ddp = sdxl_ddp_run
    fsdp = tmp_path / "fsdp2"
    launch("torchrun", [*sdxl_lora_args(pipe, images, fsdp), "distributed=fsdp2"], timeout=600)
    rows_f, rows_d = train_rows(fsdp), train_rows(ddp)
    assert [r["step"] for r in rows_f] == [1, 2, 3, 4] and [r["global_batch"] for r in rows_f] == [4] * 4
    assert [r["lr"] for r in rows_f] == [r["lr"] for r in rows_d]
    for a, b in zip(rows_f, rows_d):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL)
    assert json.loads((fsdp / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["engine"] == "fsdp2"
    (tensors, meta), (ddp_tensors, ddp_meta) = lora_file(fsdp), lora_file(ddp)
    assert tensors.keys() == ddp_tensors.keys()
    assert _unordered(meta) == _unordered(ddp_meta)
    for sub in ("pytorch_lora_weights.safetensors", "raw/pytorch_lora_weights.safetensors"):  # EMA and raw
        wf, wd = load_file(str(fsdp / "final" / sub)), load_file(str(ddp / "final" / sub))
        assert wf.keys() == wd.keys()
        worst = max(float((wf[k] - wd[k]).abs().max()) for k in wf)
        print(f"final/{sub}: largest |fsdp2 - ddp| = {worst:.2e}")
        assert worst <= 1e-4
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if ".up." in k)  # B starts at zero: trained
    loaded_pipe = StableDiffusionXLPipeline.from_pretrained(str(pipe))
    loaded_pipe.load_lora_weights(str(fsdp / "final"))
    (adapter,) = loaded_pipe.unet.peft_config
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(loaded_pipe.unet, adapter_name=adapter))
    assert {f"unet.{k}" for k in loaded} == set(tensors)
    assert all(torch.equal(v, tensors[f"unet.{k}"]) for k, v in loaded.items())


def test_ema_of_sharded_parameters(tmp_path):
    """components/ema_gather on DTensors (2 ranks, this file as the worker): the EMA built from and stepped on
    FSDP2 shards equals an EMA of the same unsharded model, `copy_to` writes the averages into every rank's
    shards, and `store`/`restore` give the live weights back; groups of 64 bytes force many gathers."""
    launch("torchrun", [], script=Path(__file__), timeout=180)


def _ema_worker() -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from difftrain.components.ema import EMAModel

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = copy.deepcopy(ref)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    ema = EMAModel(model.named_parameters(), decay=0.5, foreach=True, gather_bucket_bytes=64)
    ref_ema = EMAModel(ref.named_parameters(), decay=0.5, foreach=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in zip((model, ref), opts):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        ema.step(list(model.parameters()))
        ref_ema.step(list(ref.parameters()))
        for s, r in zip(ema.shadow_params, ref_ema.shadow_params):
            assert type(s) is torch.Tensor and torch.allclose(s, r, atol=1e-6), (s, r)
    live = [p.full_tensor().clone() for p in model.parameters()]
    ema.store(list(model.parameters()))
    ema.copy_to(list(model.parameters()))
    for p, s in zip(model.parameters(), ema.shadow_params):
        assert torch.equal(p.full_tensor(), s)  # every rank's shard holds the average
    ema.restore(list(model.parameters()))
    assert all(torch.equal(p.full_tensor(), v) for p, v in zip(model.parameters(), live))
    # no destroy_process_group(): with FSDP2 on gloo it let about 1 exit in 5 abort in C++ teardown
    # ("terminate called without an active exception", CI 2026-12-02); a barrier and a plain exit never did (15/15)
    dist.barrier()


if __name__ == "__main__":
    _ema_worker()
