"""trainer.compile (engine/compile.py): compiled runs train like eager ones, keep plain state-dict keys in
checkpoints, EMA and exports, resume in eager runs, and recompile a bounded number of times across sizes.

Tolerance: the losses of compiled runs equal eager within rel 1e-5 (measured on this CPU: regional inductor
differs from eager by at most ~1.2e-7 relative over 4 steps). One test runs the real inductor
backend (3 steps, a C++ compile on CPU); the end-to-end runs (validation, checkpoints, resume, export, LoRA) use
`aot_eager` (the same captured graphs without code generation): inductor compiles every validation and sampling
shape too, >2 min on this 2-core CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "tests" / "t2i"))
RTOL = 1e-5
RUN = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.checkpoints_total_limit=null",
       "trainer.validate_every=4", "model.label_dropout=0", "model.guidance_scale=1")  # the pinned first version


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _val(run: Path) -> float:
    return [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r][-1]


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An eager and a regional (aot_eager) 4-step digits run (EMA on), checkpoints at steps 2 and 4."""
    from difftrain.engine import compile as compile_mod
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.run import run_training

    backend, compile_mod.DEFAULT_BACKEND = compile_mod.DEFAULT_BACKEND, "aot_eager"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compile")
    out = {}
    for mode in ("none", "regional"):
        out[mode] = root / mode
        run_training(tiny_config(out[mode], *RUN, f"trainer.compile={mode}"))
        reset_accelerate_state()
    torch.set_num_threads(threads)
    compile_mod.DEFAULT_BACKEND = backend
    return out


def test_regional_inductor_steps_match_eager(tmp_path):
    """The real backend: 3 optimizer steps of Trainer.train_step, regional inductor vs eager (train graphs only)."""
    from difftrain.engine.distributed import make_accelerator, reset_accelerate_state
    from difftrain.engine.setup import build_run
    from difftrain.engine.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    measured = {}
    for mode in ("none", "regional"):
        cfg = tiny_config(tmp_path / mode, *RUN, f"trainer.compile={mode}")
        parts = build_run(cfg, tmp_path / mode, make_accelerator(cfg))
        trainer = Trainer(parts, cfg["trainer"], cfg["seed"], tmp_path / mode)
        measured[mode] = []
        for _ in range(3):
            measured[mode].append(trainer.train_step()[0])
            trainer.step += 1
        parts.stream.close()
        reset_accelerate_state()
    torch.set_num_threads(threads)
    assert measured["none"][0] == pytest.approx(1.0511380434036255, rel=1e-6)  # the pinned first loss
    assert measured["regional"] == pytest.approx(measured["none"], rel=RTOL)


def test_regional_compile_trains_like_eager(runs):
    eager, compiled = _losses(runs["none"]), _losses(runs["regional"])
    assert len(eager) == 4 and eager[0] == pytest.approx(1.0511380434036255, rel=1e-6)  # the pinned first loss
    assert compiled == pytest.approx(eager, rel=RTOL)
    assert _val(runs["regional"]) == pytest.approx(_val(runs["none"]), rel=RTOL)


def test_compiled_checkpoints_and_exports_keep_plain_keys(runs):
    from diffusers import UNet2DModel

    for name in ("model.safetensors", "ema.safetensors"):
        eager = _keys(runs["none"] / "checkpoints" / "checkpoint-2" / name)
        compiled = _keys(runs["regional"] / "checkpoints" / "checkpoint-2" / name)
        assert compiled == eager and len(eager) > 10
        assert not any("_orig_mod" in k for k in compiled)
    exported = UNet2DModel.from_pretrained(str(runs["regional"] / "final" / "unet"))
    reference = UNet2DModel.from_pretrained(str(runs["none"] / "final" / "unet"))
    assert list(exported.state_dict()) == list(reference.state_dict())
    diff = max((a - b).abs().max().item() for a, b in zip(exported.parameters(), reference.parameters()))
    assert diff < 1e-4


def test_compiled_checkpoint_resumes_in_an_eager_run(runs, tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "resumed"
    shutil.copytree(runs["regional"], run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "final")
    run_training(tiny_config(run, *RUN, "trainer.compile=none", "resume=latest"))
    resumed = _losses(run)
    assert len(resumed) == 4
    assert resumed[2:] == pytest.approx(_losses(runs["regional"])[2:], rel=RTOL)
    assert resumed[2:] == pytest.approx(_losses(runs["none"])[2:], rel=RTOL)


def test_full_compile_matches_eager(runs, tmp_path, monkeypatch):
    from difftrain.engine import compile as compile_mod
    from difftrain.engine.run import run_training

    monkeypatch.setattr(compile_mod, "DEFAULT_BACKEND", "aot_eager")
    run = tmp_path / "full"
    run_training(tiny_config(run, *RUN, "trainer.compile=full"))
    assert _losses(run) == pytest.approx(_losses(runs["none"]), rel=RTOL)
    keys = _keys(run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert keys == _keys(runs["none"] / "checkpoints" / "checkpoint-4" / "model.safetensors")


def test_recompiles_are_bounded_across_bucket_sizes():
    """Static graphs: each new size compiles once per region shape; a size seen before compiles nothing."""
    import torch._dynamo
    from diffusers import UNet2DModel
    from torch._dynamo.testing import CompileCounter

    from difftrain.engine.compile import RECOMPILE_LIMIT, compile_module

    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    counter = CompileCounter()
    assert compile_module(unet, "regional", backend=counter) == 9  # 2 down + 4 up + 2 mid resnets, 1 attention
    frames = []
    for side in (8, 12, 8, 12, 8):
        unet(torch.randn(2, 1, side, side), torch.tensor([3, 5])).sample.mean().backward()
        frames.append(counter.frame_count)
    assert 0 < frames[0] < frames[1], frames
    assert frames[4] == frames[1], frames  # buckets that come back reuse their graphs
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    assert limit >= RECOMPILE_LIMIT
    torch._dynamo.reset()


def test_regions_of_every_family():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from difftrain.engine.compile import regions

    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    sd3 = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=64, out_channels=4)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])

    def names(model):
        found = regions(model)
        return {type(m).__name__: sum(type(x) is type(m) for x in found) for m in found}

    # UNet: resnets 2 down + 4 up + 2 mid; one Transformer2DModel per cross-attention layer (1 down, 2 up, 1 mid)
    assert names(unet) == {"ResnetBlock2D": 8, "Transformer2DModel": 4}
    assert names(sd3) == {"JointTransformerBlock": 2}
    assert names(flux) == {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 2}


def test_lora_gradient_checkpointing_and_compile(tmp_path, monkeypatch):
    """sd15 LoRA + gradient checkpointing + EMA: regional (aot_eager) equals eager; only adapters train."""
    from tiny_pipes import lora_file, pipeline_dir, t2i_config, write_images

    from difftrain.engine import compile as compile_mod
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.run import run_training

    monkeypatch.setattr(compile_mod, "DEFAULT_BACKEND", "aot_eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = pipeline_dir("sd15", tmp_path / "pipes")
    images = write_images(tmp_path / "photos")
    out = {}
    for mode in ("none", "regional"):
        out[mode] = tmp_path / mode
        run_training(t2i_config(out[mode], "sd15", pipe, images, "lora=on", "lora.rank=2",
                                "trainer.gradient_checkpointing=true", f"trainer.compile={mode}",
                                "data.cache_latents=true"))
        reset_accelerate_state()
    torch.set_num_threads(threads)
    assert _losses(out["regional"]) == pytest.approx(_losses(out["none"]), rel=RTOL)
    eager_file, compiled_file = lora_file(out["none"])[0], lora_file(out["regional"])[0]
    assert sorted(compiled_file) == sorted(eager_file) and len(eager_file) > 0
    assert not any("_orig_mod" in k for k in compiled_file)
    checkpoint = _keys(out["regional"] / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert checkpoint and all(".lora_" in k for k in checkpoint)


def test_channels_last_tf32_and_fused_adamw_settings():
    from diffusers import UNet2DConditionModel

    from difftrain.config.schema import AdamWConfig
    from difftrain.engine.compile import apply_speed_options, wants_channels_last
    from difftrain.engine.optim import build_optimizer

    assert wants_channels_last(None, torch.device("cuda")) and not wants_channels_last(None, torch.device("cpu"))
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    done = apply_speed_options(unet, {"channels_last": None, "allow_tf32": True, "deterministic": True},
                               torch.device("cpu"))
    assert done == {"tf32": False, "channels_last": False, "compiled": 0}  # deterministic: no TF32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    done = apply_speed_options(unet, {"channels_last": True, "allow_tf32": True}, torch.device("cpu"))
    assert done["channels_last"] and done["tf32"] and torch.backends.cuda.matmul.allow_tf32
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(AdamWConfig(), params, device="cuda").defaults["fused"] is True
    assert build_optimizer(AdamWConfig(), params, device="cpu").defaults["fused"] is True
    assert not build_optimizer(AdamWConfig(), params, device="mps").defaults.get("fused")
    # the fused CPU kernel is the same AdamW: 5 steps agree with torch's per-tensor loop to float rounding
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 33, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(5)]
    weights = {}
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build_optimizer(AdamWConfig(lr=1e-2, weight_decay=0.1), ps, device="cpu" if fused else None)
        for step in grads:
            for p, grad in zip(ps, step):
                p.grad = grad.clone()
            opt.step()
        weights[fused] = ps
    for a, b in zip(weights[True], weights[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
