"""Memory features on CPU: model.quantize_base (int8 runs here; nf4 and fp8 exit 2 naming what works),
optimizer=adamw8bit, VAE tiling.

Tolerance: a 4-step LoRA run on the torchao int8 base gives losses within 2 % (relative) of the same run on the
fp32 base (measured here: at most ~0.1 %); the exported LoRA file has the same keys.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_in_process
from tiny_pipes import lora_file, losses, one_thread, pipeline_dir, t2i_config

one_thread = pytest.fixture(autouse=True)(one_thread)
LOSS_RTOL = 0.02


@pytest.fixture(scope="module")
def lora_runs(sd15, images, tmp_path_factory):
    """4-step LoRA runs on the fp32 base and on the int8 base (same seed, data and adapters)."""
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.run import run_training

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for kind in ("none", "int8"):
        out[kind] = root / kind
        run_training(t2i_config(out[kind], "sd15", sd15, images, "lora=on", "lora.rank=2",
                                f"model.quantize_base={kind}", "data.cache_latents=true"))
        reset_accelerate_state()
    return out


def test_int8_base_lora_trains_close_to_the_fp32_base(lora_runs):
    plain = [row[1] for row in losses(lora_runs["none"])]
    quantized = [row[1] for row in losses(lora_runs["int8"])]
    assert len(quantized) == 4 and all(torch.isfinite(torch.tensor(quantized)))
    assert quantized == pytest.approx(plain, rel=LOSS_RTOL)
    assert quantized != plain  # the base really is quantised


def test_int8_lora_export_has_the_unquantised_keys(lora_runs):
    plain, _ = lora_file(lora_runs["none"])
    quantized, meta = lora_file(lora_runs["int8"])
    assert sorted(quantized) == sorted(plain) and len(plain) > 0
    assert all(v.dtype == torch.float32 for v in quantized.values())
    assert {tuple(v.shape) for v in quantized.values()} == {tuple(v.shape) for v in plain.values()}
    info = json.loads((lora_runs["int8"] / "final" / "difftrain.json").read_text())
    assert info["lora"] is True


def test_int8_base_holds_quantised_weights_and_fp32_adapters(sd15, images, tmp_path):
    from difftrain.engine.distributed import make_accelerator, reset_accelerate_state
    from difftrain.engine.setup import build_run
    from difftrain.families.quantize import quantized_layers

    cfg = t2i_config(tmp_path / "run", "sd15", sd15, images, "lora=on", "lora.rank=2", "model.quantize_base=int8",
                     "model.vae_tiling=true")
    parts = build_run(cfg, tmp_path / "run", make_accelerator(cfg))
    unet = parts.family.module.denoiser
    trainable = {n: p for n, p in parts.family.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    n_linear = sum(1 for m in unet.modules() if type(m).__name__ == "TorchaoLoraLinear")
    assert n_linear == 4 * 2 * 4  # 4 Transformer2DModels x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    assert quantized_layers(unet) >= n_linear
    assert parts.family.t2i.vae.use_tiling  # model.vae_tiling=true
    parts.stream.close()
    reset_accelerate_state()


def test_torchao_linear_takes_the_autocast_dtype():
    """torchao's linear runs above autocast and keeps its input's dtype; the hook gives a quantised Linear the
    autocast dtype, as autocast gives an nn.Linear (and leaves it alone outside autocast)."""
    from difftrain.families.quantize import quantize_frozen_base

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16).requires_grad_(False)
    reference = torch.nn.Linear(16, 8).to(torch.bfloat16)
    assert quantize_frozen_base(model, "int8", torch.device("cpu"), torch.bfloat16) == 1
    x = torch.randn(2, 16)
    assert model(x.bfloat16()).dtype == torch.bfloat16 and model(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference(x).dtype == torch.bfloat16
        assert model(x).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_int8_base_trains_with_bf16_autocast(family, images, tmp_path, tmp_path_factory, monkeypatch):
    """int8 + trainer.mixed_precision=bf16 on CPU: the UNets used to meet fp32 time embeddings from the quantised
    Linears in a bf16 GroupNorm ("mixed dtype (CPU)"). Now: finite losses, fp32 adapters, torchao base weights."""
    import difftrain.engine.setup as setup
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.run import run_training
    from difftrain.families.quantize import quantized_layers

    built, original = {}, setup.build_run

    def build_run(*args, **kwargs):  # keep the run's parts to look at the trained module
        built["parts"] = original(*args, **kwargs)
        return built["parts"]

    monkeypatch.setattr(setup, "build_run", build_run)
    run = tmp_path / "run"
    extra = ("lora=on", "lora.rank=2", "model.quantize_base=int8", "trainer.mixed_precision=bf16",
             "trainer.max_steps=2")
    if family == "sdxl":
        from tiny_sdxl import build_sdxl, sdxl_config, write_two_shapes

        cfg = sdxl_config(run, build_sdxl(tmp_path / "sdxl"), write_two_shapes(tmp_path / "photos"), *extra)
    else:
        cfg = t2i_config(run, family, pipeline_dir(family, tmp_path_factory.mktemp("pipes")), images, *extra)
    try:
        run_training(cfg)
    finally:
        reset_accelerate_state()
    values = [row[1] for row in losses(run)]
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
    module = built["parts"].family.module
    trainable = [p for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    base = [m.base_layer for m in module.denoiser.modules() if type(m).__name__ == "TorchaoLoraLinear"]
    assert base and all(type(m.weight).__module__.startswith("torchao") for m in base)
    assert quantized_layers(module.denoiser) >= len(base)
    assert all(v.dtype == torch.float32 for v in lora_file(run)[0].values())


_cli = cli_in_process


def _argv(run, pipe, images, *extra) -> list[str]:
    from conftest import TINY_T2I

    base = TINY_T2I
    return ["train", *base, "model=sd15", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={images}",
            "data.resolution=32", "trainer.batch_size=4", "validation.prompts=[a photo of a dog]",
            "validation.num_images=1", "validation.steps=2", f"output_dir={run}", *extra]


@pytest.mark.parametrize("kind,words", [
    ("nf4", ["model.quantize_base=nf4", "CUDA", "model.quantize_base=int8"]),
    ("fp8", ["model.quantize_base=fp8", "compute capability >= 8.9", "model.quantize_base=int8"]),
])
def test_nf4_and_fp8_on_cpu_exit_2_naming_what_works(sd15, images, tmp_path, kind, words):
    code, out = _cli(*_argv(tmp_path / "run", sd15, images, "lora=on", f"model.quantize_base={kind}"))
    assert code == 2, out
    assert all(w in out for w in words), out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_quantised_base_without_lora_is_a_config_error(sd15, images, tmp_path):
    code, out = _cli(*_argv(tmp_path / "run", sd15, images, "model.quantize_base=int8"))
    assert code == 2 and "model.quantize_base=int8" in out and "lora=on" in out, out
    assert not (tmp_path / "run").exists()


def test_adamw8bit_trains_on_cpu_with_8bit_state(tmp_path):
    """bitsandbytes' 8-bit AdamW on CPU (bitsandbytes >= 0.45 has a CPU backend): finite losses, uint8 moments
    for tensors of >= 4096 elements (smaller ones keep 32-bit state, as bitsandbytes does everywhere)."""
    from conftest import tiny_config

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run, "optimizer=adamw8bit", "model.block_out_channels=[32,64]",
                             "model.norm_num_groups=8", "trainer.max_steps=3", "ema=none"))
    values = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(values) == 3 and all(0 < v < 10 for v in values)
    state = torch.load(run / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    dtypes = {v.get("__bnb_optimizer_quant_state__", v)["state1"].dtype for v in state.values()}
    assert torch.uint8 in dtypes


def test_vae_tiling_setting():
    from difftrain.families.t2i import VAE_TILING_ABOVE, vae_tiling_wanted

    assert not vae_tiling_wanted(None, [(1024, 1024), (768, 1344)])
    assert vae_tiling_wanted(None, [(1024, 1024), (VAE_TILING_ABOVE + 64, 1024)])
    assert vae_tiling_wanted(True, [(64, 64)]) and not vae_tiling_wanted(False, [(4096, 4096)])
