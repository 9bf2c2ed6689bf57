"""model=sdxl end to end on a tiny SDXL pipeline saved to disk: the loss against the diffusers SDXL script's,
micro-conditioning of flipped crops, full and LoRA fine-tunes (caches on and off, two aspect-ratio buckets, bf16
on CPU), exact resume, a replacement VAE; every output loads into StableDiffusionXLPipeline and generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_pipes import cache_tensors, lora_file, losses, one_thread
from tiny_sdxl import build_sdxl, sdxl_config, write_two_shapes

one_thread = pytest.fixture(autouse=True)(one_thread)
LORA_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
                 ".lora_linear_layer.up.weight")


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("pipes") / "sdxl")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_two_shapes(tmp_path_factory.mktemp("data") / "photos")


def _generate(pipe, size=(32, 32)) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a dog", num_inference_steps=2, height=size[0], width=size[1], output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, *size) and torch.isfinite(out).all()
    return out


# ---- the objective against diffusers' train_text_to_image_sdxl.py ----------------------------------------
def _script_time_ids(images, samples, batch) -> torch.Tensor:
    """add_time_ids as the script makes them: original size before the resize, then resize -> flip -> crop, the
    crop (y1, x1) taken in the flipped image. The window is found by matching this sample's pixels."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from difftrain.data.samples import unit_range

    th, tw = batch["target_size"]
    rows = []
    for i, position in enumerate(batch["indices"].tolist()):
        with Image.open(images / samples.names[position]) as im:
            original = (im.height, im.width)
            resized = TF.resize(im.convert("RGB"), batch["resized_sizes"][i].tolist(),
                                interpolation=samples.augment.interpolation, antialias=True)
        if batch["flips"][i]:
            resized = TF.hflip(resized)
        x = unit_range(TF.pil_to_tensor(resized))
        windows = [(top, left) for top in range(x.shape[1] - th + 1) for left in range(x.shape[2] - tw + 1)
                   if torch.equal(x[:, top:top + th, left:left + tw], batch["pixels"][i])]
        assert len(windows) == 1, windows
        rows.append([*original, *windows[0], th, tw])
    return torch.tensor(rows, dtype=torch.float32)


def _script_prompt_embeds(sdxl, captions):
    """encode_prompt of the script: penultimate states of both encoders concatenated, pooled of encoder 2."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    states, pooled = [], None
    for tok, enc, cls in (("tokenizer", "text_encoder", CLIPTextModel),
                          ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(str(sdxl), subfolder=tok)
        encoder = cls.from_pretrained(str(sdxl), subfolder=enc)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


@pytest.mark.parametrize("scheduler", [("scheduler=ddpm",), ("scheduler=ddpm_v", "scheduler.rescale_betas_zero_snr=true")],
                         ids=["epsilon", "v_zero_snr"])
def test_loss_is_the_diffusers_sdxl_script_loss(tmp_path, sdxl, images, scheduler):
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr

    from difftrain.data.samples import MicroBatchKey, unit_range
    from difftrain.engine.distributed import make_accelerator
    from difftrain.engine.setup import build_run

    cfg = sdxl_config(tmp_path, sdxl, images, *scheduler, "loss_weighting=min_snr", "noise.offset=0.1",
                      "data.random_flip=true", "data.center_crop=false", "ema=none")
    parts = build_run(cfg, tmp_path, make_accelerator(cfg))
    samples = parts.data.samples
    tall = [tuple(b) for b in samples.buckets].index((40, 24))
    positions = tuple(p for p in parts.data.train if samples.bucket_of[p] == tall)
    for epoch in range(50):  # an epoch whose draws flip some samples and not others
        batch = samples.__getitems__(MicroBatchKey(0, 0, epoch, positions))
        if 0 < int(batch["flips"].sum()) < len(positions):
            break
    batch["pixels"] = unit_range(batch["pixels"])
    generator = torch.Generator().manual_seed(7)
    x0, cond = parts.family.inputs(batch, "cpu", generator=generator)  # the latent draw, then the step's draws
    draw = parts.objective.draw(x0, generator)
    ours = parts.objective.loss(parts.family, parts.model, x0, cond, draw)

    # the script, written out: latents, noise (+ offset), add_noise, target, UNet with added conditions, Min-SNR
    generator = torch.Generator().manual_seed(7)
    vae = AutoencoderKL.from_pretrained(str(sdxl), subfolder="vae")
    with torch.no_grad():
        latents = vae.encode(batch["pixels"]).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    noise += 0.1 * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    assert torch.equal(noise, draw.noise)
    timesteps = draw.indices  # the script draws randint(0, T); here the same draw for both
    v = "scheduler=ddpm_v" in scheduler
    noise_scheduler = DDPMScheduler.from_pretrained(str(sdxl), subfolder="scheduler", rescale_betas_zero_snr=v)
    noise_scheduler.register_to_config(prediction_type="v_prediction" if v else "epsilon")
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v else noise
    add_time_ids = _script_time_ids(images, samples, batch)
    prompt_embeds, pooled = _script_prompt_embeds(sdxl, batch["captions"])
    assert torch.equal(cond["time_ids"], add_time_ids)
    torch.testing.assert_close(cond["encoder_hidden_states"], prompt_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-5, atol=1e-6)
    unet = UNet2DConditionModel.from_pretrained(str(sdxl), subfolder="unet")
    pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled},
                return_dict=False)[0]
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1) if v else weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights
    torch.testing.assert_close(ours, loss.mean(), rtol=1e-5, atol=1e-7)
    assert batch["flips"].any()


def test_flipped_crop_left_is_measured_in_the_flipped_image():
    """difftrain crops at (top, left), then flips; the script flips, then crops at (y1, x1). The same window is
    x1 = resized_w - left - target_w, which is what the UNet is told (centre crops of odd room included)."""
    from difftrain.families.sdxl import micro_conditioning

    resized = torch.arange(2 * 40 * 25, dtype=torch.float32).view(2, 40, 25)  # (C, h, w), resized to cover
    crops, flips = torch.tensor([[0, 0], [0, 1], [0, 0]]), torch.tensor([False, True, True])
    batch = {"original_sizes": torch.tensor([[64, 40]] * 3), "crop_offsets": crops, "flips": flips,
             "resized_sizes": torch.tensor([[40, 25]] * 3), "target_size": (40, 24)}
    time_ids = micro_conditioning(batch)["time_ids"]
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[64, 40, 0, 0, 40, 24], [64, 40, 0, 0, 40, 24], [64, 40, 0, 1, 40, 24]]
    for (top, left), flip, ids in zip(crops.tolist(), flips.tolist(), time_ids.long().tolist()):
        ours = resized[:, top:top + 40, left:left + 24]
        ours = ours.flip(-1) if flip else ours
        seen = resized.flip(-1) if flip else resized
        y1, x1 = ids[2:4]
        assert torch.equal(ours, seen[:, y1:y1 + 40, x1:x1 + 24])
    assert micro_conditioning({**batch, "flips": None})["time_ids"][:, 2:4].tolist() == crops.tolist()


# ---- full fine-tunes ----------------------------------------------------------------------------------------
def test_full_finetune_with_caches_and_two_buckets_is_an_sdxl_pipeline(tmp_path, sdxl, images):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    summary = run_training(sdxl_config(run, sdxl, images, "data.cache_latents=true", "data.random_flip=true",
                                       "noise.offset=0.05"))
    assert summary["steps"] == 4
    buckets = {(b["height"], b["width"]): b["train_samples"] for b in json.loads((run / "data" / "buckets.json").read_text())}
    assert buckets[(32, 32)] == 4 and buckets[(40, 24)] == 4
    final = run / "final"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(final))
    assert pipe.scheduler.config.prediction_type == "epsilon" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    _generate(pipe)
    _generate(pipe, (40, 24))
    raw = UNet2DConditionModel.from_pretrained(str(final / "unet_raw"))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), raw.parameters()))  # EMA in final
    base = UNet2DConditionModel.from_pretrained(str(sdxl), subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), raw.parameters()))  # it trained
    latents = cache_tensors(run, "latents")  # filled lazily: the entries the 4 steps drew, one per bucket size
    assert {tuple(v.shape) for v in latents.values()} == {(8, 16, 16), (8, 20, 12)}
    text = cache_tensors(run, "text")
    assert len(text) == 2 * 5 and text["1.encoder_hidden_states"].shape == (77, 24) and text["1.text_embeds"].shape == (8,)
    info = json.loads((final / "difftrain.json").read_text())
    assert info["family"] == "sdxl" and info["lora"] is False and set(info["caches"]) == {"latents", "text"}
    assert (run / "samples" / "step_000004.png").is_file()
    ckpt = load_file(str(run / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    assert ckpt and all(k.startswith("denoiser.") for k in ckpt)


def test_full_v_zero_snr_min_snr_dream_bf16_without_caches(tmp_path, sdxl, images):
    from diffusers import StableDiffusionXLPipeline

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(sdxl_config(run, sdxl, images, "scheduler=ddpm_v", "scheduler.rescale_betas_zero_snr=true",
                             "loss_weighting=min_snr", "dream=on", "noise.offset=0.05", "data.cache_text_embeddings=false",
                             "data.cache_latents=false",
                             "trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true", "ema=none",
                             "trainer.max_steps=2"))
    assert not list((run / "cache").glob("latents-*")) and not list((run / "cache").glob("text-*"))
    assert all(torch.isfinite(torch.tensor(row[1])) for row in losses(run))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(run / "final"))
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    _generate(pipe)


# ---- LoRA ---------------------------------------------------------------------------------------------------
def _check_lora_keys(tensors: dict, prefix: str, module: torch.nn.Module, targets) -> None:
    """Every `prefix` key names a LoRA weight of a target Linear of `module`; every target Linear has one."""
    names = dict(module.named_modules())
    seen = set()
    for key in (k for k in tensors if k.startswith(prefix)):
        path = next(key[len(prefix):-len(s)] for s in LORA_SUFFIXES if key.endswith(s))
        path = path if path in names else path.removeprefix("text_model.")  # transformers 5 flattened CLIP
        assert path in names and path.endswith(targets), key
        seen.add(path)
    assert seen == {n for n, m in names.items() if isinstance(m, torch.nn.Linear) and n.endswith(targets)}


def test_lora_on_unet_and_both_text_encoders_bf16_loads_with_load_lora_weights(tmp_path, sdxl, images):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(sdxl_config(run, sdxl, images, "lora=on", "lora.rank=4", "lora.alpha=8", "lora.train_text_encoder=true",
                             "trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true",
                             "data.caption_dropout=0.3", "optimizer.lr=0.01"))
    tensors, meta = lora_file(run)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    base = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    _check_lora_keys(tensors, "unet.", base.unet, ("to_k", "to_q", "to_v", "to_out.0"))
    for part in ("text_encoder", "text_encoder_2"):
        _check_lora_keys(tensors, f"{part}.", getattr(base, part), ("q_proj", "k_proj", "v_proj", "out_proj"))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert meta[f"{part}.r"] == 4 and meta[f"{part}.lora_alpha"] == 8
        assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith(f"{part}.") and ".up." in k)
    before = _generate(base)
    base.load_lora_weights(str(run / "final"))
    for part in ("text_encoder", "text_encoder_2"):
        (adapter,) = getattr(base, part).peft_config
        assert len(get_peft_model_state_dict(getattr(base, part), adapter_name=adapter)) == sum(
            k.startswith(f"{part}.") for k in tensors)
    after = _generate(base)
    assert (after - before).abs().max() > 1e-4  # the adapters change the image
    from safetensors.torch import load_file

    ckpt = load_file(str(run / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)
    assert {k.split(".")[1] for k in ckpt if k.startswith("text_encoders.")} == {"text_encoder", "text_encoder_2"}


def test_lora_with_caches_resume_is_bitwise_exact(tmp_path, sdxl, images):
    from difftrain.engine.run import run_training

    extra = ("lora=on", "data.cache_latents=true", "data.random_flip=true", "data.center_crop=false",
             "data.caption_dropout=0.3", "trainer.mixed_precision=bf16", "trainer.checkpoints_total_limit=null")
    full = tmp_path / "full"
    run_training(sdxl_config(full, sdxl, images, *extra))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    summary = run_training(sdxl_config(part, sdxl, images, *extra, "resume=latest"))
    assert summary["resumed_from_step"] == 2
    assert losses(full) == losses(part)
    a, b = lora_file(full)[0], lora_file(part)[0]
    assert {k.split(".")[0] for k in a} == {"unet"}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- a replacement VAE ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def other_vae(tmp_path_factory, sdxl):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(sdxl), subfolder="vae"))
    out = tmp_path_factory.mktemp("vaes") / "other"
    vae.save_pretrained(str(out))
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("vae_dtype,expected", [("fp32", torch.float32), ("weight", torch.bfloat16)])
def test_model_vae_runs_in_fp32_unless_told(tmp_path, sdxl, images, other_vae, vae_dtype, expected, monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from difftrain.engine.run import run_training
    from difftrain.families.t2i import LatentTextToImage

    seen = {}
    prepare = LatentTextToImage.prepare

    def spy(self, *args, **kwargs):
        prepare(self, *args, **kwargs)
        seen["vae"] = self.vae.dtype

    monkeypatch.setattr(LatentTextToImage, "prepare", spy)
    run = tmp_path / "run"
    run_training(sdxl_config(run, sdxl, images, f"model.vae={other_vae}", f"model.vae_dtype={vae_dtype}", "ema=none",
                             "trainer.mixed_precision=bf16", "trainer.max_steps=1", "data.cache_latents=true"))
    assert seen["vae"] == expected  # the VAE encoded the cache (and would the pixels) in this dtype
    final = StableDiffusionXLPipeline.from_pretrained(str(run / "final"))
    other = AutoencoderKL.from_pretrained(str(other_vae))
    assert final.vae.dtype == torch.float32 and _same_weights(final.vae, other)  # final/ holds the named VAE, as named
    assert not _same_weights(final.vae, AutoencoderKL.from_pretrained(str(sdxl), subfolder="vae"))


def test_lora_run_with_model_vae_samples_with_it(tmp_path, sdxl, images, other_vae):
    from difftrain.cli.main import main
    from difftrain.engine.run import run_training
    from difftrain.families.sdxl import SDXLFamily

    run = tmp_path / "run"
    cfg = sdxl_config(run, sdxl, images, "lora=on", f"model.vae={other_vae}", "trainer.max_steps=1", "ema=none")
    run_training(cfg)
    from diffusers import AutoencoderKL

    finished = SDXLFamily.load_finished(run, cfg, "cpu", None)
    assert _same_weights(finished.pipeline().vae, AutoencoderKL.from_pretrained(str(other_vae)))
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--prompt", "a red cat", "--num", "1", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_unusable_vaes_are_one_paragraph_errors(tmp_path, sdxl):
    from diffusers import AutoencoderKL

    from difftrain import registry
    from difftrain.errors import UserError

    def build(vae):
        return registry.build("model", {"name": "sdxl", "pretrained": str(sdxl), "revision": None, "variant": None,
                                        "resolution": 32, "vae": str(vae), "vae_dtype": "fp32"})

    config = dict(AutoencoderKL.load_config(str(sdxl), subfolder="vae"))
    deeper = {**config, "block_out_channels": [4, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3}
    AutoencoderKL.from_config(deeper).save_pretrained(str(tmp_path / "deeper"))
    with pytest.raises(UserError, match="downsamples by 4, the pipeline's VAE by 2"):
        build(tmp_path / "deeper")
    AutoencoderKL.from_config({**config, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}).save_pretrained(
        str(tmp_path / "normalised"))
    with pytest.raises(UserError, match="latents_mean/latents_std"):
        build(tmp_path / "normalised")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="could not load model.vae=") as info:
        build(tmp_path / "broken")
    assert "\n" not in str(info.value)


# ---- rejected combinations ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["scheduler=sd3"], "model=sdxl cannot train with scheduler=sd3"),
    (["scheduler.num_train_timesteps=500"], "scheduler.num_train_timesteps=500 has no effect with model=sdxl"),
    (["model.vae_dtype=fp16"], "model.vae_dtype"),
    (["model.vae=./no/such/vae"], "model.vae './no/such/vae' is not a folder"),
    (["lora=on", "lora.train_text_encoder=true", "data.cache_text_embeddings=true"], "cannot be cached"),
    (["data.resolution=1020"], "must be a multiple of 8"),
])
def test_meaningless_combinations_are_rejected(tmp_path, sdxl, images, overrides, expected):
    from difftrain.config.validate import ConfigError

    with pytest.raises(ConfigError) as info:
        sdxl_config(tmp_path, sdxl, images, *overrides)
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_cli_exits_2_for_sdxl_with_sd3_scheduler_and_for_a_wrong_pipeline(tmp_path, sdxl, images):
    import subprocess
    import sys

    from conftest import cli_env

    from difftrain import registry
    from difftrain.errors import UserError

    result = subprocess.run([sys.executable, "-m", "difftrain", "train", "model=sdxl", f"model.pretrained={sdxl}",
                             "scheduler=sd3", "data=imagefolder", f"data.path={images}"], env=cli_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert "model=sdxl cannot train with scheduler=sd3" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="is a StableDiffusionXLPipeline pipeline, but model=sd15 .*use model=sdxl"):
        registry.build("model", {"name": "sd15", "pretrained": str(sdxl), "revision": None, "variant": None,
                                 "resolution": 32})
