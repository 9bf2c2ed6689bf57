"""model=sd15 end to end on a tiny SD1-style pipeline saved to disk: full and LoRA fine-tunes, both DDPM
prediction types, caches on and off, bf16 on CPU, exact resume; every output loads into diffusers and generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_pipes import cache_tensors, lora_file, losses, one_thread, t2i_config

one_thread = pytest.fixture(autouse=True)(one_thread)


def _generate(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    return out


def test_full_finetune_epsilon_with_caches_is_a_diffusers_pipeline(tmp_path, sd15, images):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    summary = run_training(t2i_config(run, "sd15", sd15, images, "scheduler=ddpm", "data.cache_latents=true",
                                      "data.random_flip=true", "noise.offset=0.05"))
    assert summary["steps"] == 4
    final = run / "final"
    pipe = DiffusionPipeline.from_pretrained(str(final))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the pipeline's own inference scheduler
    _generate(pipe)
    raw = UNet2DConditionModel.from_pretrained(str(final / "unet_raw"))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), raw.parameters()))  # EMA in final
    base = UNet2DConditionModel.from_pretrained(str(sd15), subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), raw.parameters()))  # it trained
    # caches, filled lazily by the 4 steps (2 epochs of the 8 images): latents of each sample's drawn flips,
    # one prompt row per distinct caption + the empty one; bitwise what a fill ahead of step 1 computes, and
    # a run filling ahead trains the same losses
    from safetensors.torch import load_file

    ahead = tmp_path / "ahead"
    run_training(t2i_config(ahead, "sd15", sd15, images, "scheduler=ddpm", "data.cache_latents=true",
                            "data.random_flip=true", "noise.offset=0.05", "data.cache_fill=ahead"))
    assert losses(ahead) == losses(run)
    latents, every = cache_tensors(run, "latents"), cache_tensors(ahead, "latents")
    assert sorted(every) == sorted(f"{e}.mean_logvar" for e in range(16))  # entry 2 * sample + flip
    assert {int(k.split(".")[0]) // 2 for k in latents} == set(range(8)) and len(latents) < 16
    assert all(torch.equal(v, every[k]) for k, v in latents.items())
    assert {tuple(v.shape) for v in every.values()} == {(8, 16, 16)}
    text = cache_tensors(run, "text")
    assert sorted(text) == sorted(cache_tensors(ahead, "text")) == [f"{i}.encoder_hidden_states" for i in range(5)]
    assert text["4.encoder_hidden_states"].shape == (77, 8)
    info = json.loads((final / "difftrain.json").read_text())
    assert info["family"] == "sd15" and info["lora"] is False and set(info["caches"]) == {"latents", "text"}
    assert (run / "samples" / "step_000004.png").is_file()
    # a checkpoint holds the trainable weights only (the UNet here)
    ckpt = load_file(str(run / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    assert all(k.startswith("denoiser.") for k in ckpt)


def test_v_prediction_min_snr_dream_without_caches(tmp_path, sd15, images):
    from diffusers import DiffusionPipeline

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, images, "scheduler=ddpm_v", "loss_weighting=min_snr", "dream=on",
                            "data.cache_text_embeddings=false", "data.cache_latents=false", "ema=none",
                            "trainer.max_steps=2"))
    assert not list((run / "cache").glob("latents-*")) and not list((run / "cache").glob("text-*"))
    pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    _generate(pipe)


def test_cached_and_uncached_runs_agree(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    common = ("ema=none", "trainer.max_steps=2", "data.random_flip=true", "data.caption_dropout=0.5")
    run_training(t2i_config(tmp_path / "cached", "sd15", sd15, images, *common, "data.cache_latents=true"))
    run_training(t2i_config(tmp_path / "plain", "sd15", sd15, images, *common, "data.cache_text_embeddings=false",
                            "data.cache_latents=false"))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "plain")
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, la, _, ga), (_, lb, _, gb) in zip(a, b):  # same draws; only VAE/encoder batching differs
        assert la == pytest.approx(lb, rel=1e-4) and ga == pytest.approx(gb, rel=1e-3)


def _check_lora_keys(tensors: dict, prefix: str, module: torch.nn.Module, targets, suffixes) -> None:
    """Every key of `prefix` is <adapted module>.<lora suffix> of a target module of `module`, and every
    target module of `module` is in the file."""
    names = dict(module.named_modules())
    seen = set()
    for key in (k for k in tensors if k.startswith(prefix)):
        path = next(key[len(prefix):-len(s)] for s in suffixes if key.endswith(s))
        path = path if path in names else path.removeprefix("text_model.")  # flattened CLIPTextModel
        assert path in names and any(path.endswith(t) for t in targets), key
        seen.add(path)
    expected = {n for n, m in names.items() if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in targets)}
    assert seen == expected


def test_lora_with_text_encoder_bf16_loads_with_load_lora_weights(tmp_path, sd15, images):
    from diffusers import DiffusionPipeline

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, images, "lora=on", "lora.rank=4", "lora.alpha=8",
                            "lora.train_text_encoder=true", "trainer.mixed_precision=bf16",
                            "trainer.gradient_checkpointing=true", "data.caption_dropout=0.3", "optimizer.lr=0.01"))
    tensors, meta = lora_file(run)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder"}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    base = DiffusionPipeline.from_pretrained(str(sd15))
    suffixes = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
                ".lora_linear_layer.up.weight")
    _check_lora_keys(tensors, "unet.", base.unet, ("to_k", "to_q", "to_v", "to_out.0"), suffixes)
    _check_lora_keys(tensors, "text_encoder.", base.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"),
                     suffixes)
    for part in ("unet", "text_encoder"):
        assert meta[f"{part}.r"] == 4 and meta[f"{part}.lora_alpha"] == 8
        ups = [v for k, v in tensors.items() if k.startswith(part) and ".up." in k]
        assert any(v.abs().sum() > 0 for v in ups)  # B starts at zero: the adapters (TE too) were trained
    base.load_lora_weights(str(run / "final"))
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    (adapter,) = base.unet.peft_config
    assert base.unet.peft_config[adapter].r == 4 and base.unet.peft_config[adapter].lora_alpha == 8
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet, adapter_name=adapter))
    assert all(torch.equal(loaded[k], tensors[f"unet.{k}"]) for k in loaded)
    loaded_te = get_peft_model_state_dict(base.text_encoder, adapter_name=adapter)
    assert len(loaded_te) == sum(k.startswith("text_encoder.") for k in tensors)
    _generate(base)
    from safetensors.torch import load_file

    raw = load_file(str(run / "final" / "raw" / "pytorch_lora_weights.safetensors"))  # adapters without EMA
    assert raw.keys() == tensors.keys() and any(not torch.equal(raw[k], tensors[k]) for k in raw)
    ckpt = load_file(str(run / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)  # adapters only, not the frozen base
    assert all(v.dtype == torch.float32 for v in ckpt.values())


def test_lora_resume_is_bitwise_exact(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    extra = ("lora=on", "lora.train_text_encoder=true", "data.cache_latents=true", "data.random_flip=true",
             "data.caption_dropout=0.3", "trainer.mixed_precision=bf16", "trainer.checkpoints_total_limit=null")
    full = tmp_path / "full"
    run_training(t2i_config(full, "sd15", sd15, images, *extra))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    summary = run_training(t2i_config(part, "sd15", sd15, images, *extra, "resume=latest"))
    assert summary["resumed_from_step"] == 2
    assert losses(full) == losses(part)
    a, b = lora_file(full)[0], lora_file(part)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_command_writes_a_grid(tmp_path, sd15, images):
    from difftrain.cli.main import main
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, images, "lora=on", "trainer.max_steps=1", "ema=none"))
    out = tmp_path / "grid.png"
    code = main(["sample", str(run), "--prompt", "a red cat", "--prompt", "a dog", "--num", "2", "--steps", "2",
                 "--out", str(out)])
    assert code == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2 x 2 grid, 32 px upscaled to 64, padding 2
    assert main(["sample", str(run), "--labels", "1"]) == 2  # a text-to-image run takes --prompt
    assert main(["eval", str(run)]) == 2  # digits accuracy only
