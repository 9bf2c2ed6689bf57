"""model=flux on tiny FLUX.1-style pipelines (tiny_flux.py): the loss of diffusers' train_dreambooth_lora_flux.py
(packing, ids, guidance, target eps - x0, weighting), the one documented difference (training uses inference's
resolution-dependent shift), LoRA (transformer; CLIP) and full runs with buckets of two aspect ratios, caches on
and off, bf16 on CPU, bitwise resume, outputs loaded with FluxPipeline, and the config."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny_flux import flux_dir, write_two_shapes
from tiny_pipes import cache_tensors, lora_file, losses, one_thread

one_thread = pytest.fixture(autouse=True)(one_thread)

TRANSFORMER_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
PROMPTS = ["a photo of a dog", "a red cat"]


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    return tmp_path_factory.mktemp("flux_pipes")


@pytest.fixture(scope="session")
def dev(pipes):
    return flux_dir("dev", pipes)


@pytest.fixture(scope="session")
def schnell(pipes):
    return flux_dir("schnell", pipes)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_two_shapes(tmp_path_factory.mktemp("flux_data") / "photos")


def flux_config(output_dir: Path, pipe: Path, data: Path, *overrides: str) -> dict:
    """A validated tiny model=flux config through the real Hydra tree (32 px, two buckets, batches of 2)."""
    from conftest import TINY_T2I

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    base = TINY_T2I
    return validate(compose_config([
        *base, "model=flux", f"model.pretrained={pipe}", "model.max_sequence_length=16", "data=imagefolder",
        f"data.path={data}", "data.resolution=32", "data.buckets=auto", "trainer.batch_size=2",
        "validation.prompts=[a photo of a dog]", "validation.num_images=1", "validation.steps=2",
        f"output_dir={output_dir}", *overrides]))


# ---- the loss of diffusers' script, written out ------------------------------------------------------------
def script_loss(pipe, pixels, prompts, noise, u, scheme: str, scheduler_copy, guidance_scale: float):
    """train_dreambooth_lora_flux.py's step for one batch, with its --weighting_scheme `scheme`, the noise and
    the density draw u given, and the posterior mean for the latent (what difftrain uses without a generator)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    with torch.no_grad():  # compute_text_embeddings
        clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=16, truncation=True,
                                  return_tensors="pt").input_ids
        prompt_embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        text_ids = torch.zeros(prompt_embeds.shape[1], 3)
        latents = pipe.vae.encode(pixels).latent_dist.mean
    vae = pipe.vae.config
    model_input = (latents - vae.shift_factor) * vae.scaling_factor
    vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    b, c, h, w = model_input.shape
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    indices = (u * scheduler_copy.config.num_train_timesteps).long()
    timesteps = scheduler_copy.timesteps[indices]
    step_indices = [(scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas
    sigmas = scheduler_copy.sigmas[step_indices].flatten().reshape(b, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=c, height=h, width=w)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale]).expand(b)
    pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                            pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                            img_ids=latent_image_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, height=h * vae_scale_factor, width=w * vae_scale_factor,
                                        vae_scale_factor=vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1)
    return loss.mean()


def difftrain_loss(path, pixels, prompts, noise, u, scheme: str, guidance_scale: float):
    """The same batch through FluxFamily and DiffusionObjective (the engine's objective)."""
    from difftrain.components.weighting import LossWeighting, TimestepDensity
    from difftrain.config.schema import FlowMatchSchedulerConfig
    from difftrain.config.schema_t2i import FluxModelConfig
    from difftrain.engine.objective import DiffusionObjective, StepNoise
    from difftrain.families.flux import FluxFamily

    family = FluxFamily(FluxModelConfig(pretrained=str(path), max_sequence_length=16, guidance_scale=guidance_scale))
    schedule = family.training_schedule(FlowMatchSchedulerConfig())
    density = TimestepDensity(scheme if scheme in ("logit_normal", "mode") else "uniform", 0.0, 1.0, 1.29)
    weighting = LossWeighting(scheme if scheme in ("sigma_sqrt", "cosmap") else "none")
    objective = DiffusionObjective(schedule, density, weighting)
    x0, cond = family.inputs({"pixels": pixels, "captions": prompts}, "cpu")
    draw = StepNoise(noise, noise, schedule.index_from_u(u))
    with torch.no_grad():
        return objective.loss(family, family.module, x0, cond, draw), schedule


def fixed_batch(scheme: str, size=(32, 48)):
    from difftrain.components.timesteps import compute_density_for_timestep_sampling

    generator = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, *size, generator=generator) * 2 - 1
    noise = torch.randn(2, 4, size[0] // 2, size[1] // 2, generator=generator)
    u = compute_density_for_timestep_sampling(scheme, 2, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=generator)
    return pixels, noise, u


def shifted_copy(pipe, tokens: int):
    """The script's scheduler copy with inference's shift at `tokens` image tokens (FluxPipeline's mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    return FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False, shift=math.exp(mu))


def test_packing_and_ids_are_the_pipelines_per_bucket():
    """pack / unpack / image_ids are FluxPipeline's _pack_latents / _unpack_latents / _prepare_latent_image_ids."""
    from diffusers import FluxPipeline

    from difftrain.families.flux import image_ids, pack, unpack

    for h, w in ((16, 16), (20, 12), (8, 24)):
        x = torch.randn(2, 4, h, w)
        packed = pack(x)
        assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, h, w))
        assert torch.equal(unpack(packed, h, w), FluxPipeline._unpack_latents(packed, 2 * h, 2 * w, 2))
        assert torch.equal(unpack(packed, h, w), x)
        assert torch.equal(image_ids(h, w, "cpu"), FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu",
                                                                                          torch.float32))


@pytest.mark.parametrize("kind,scheme", [("schnell", "logit_normal"), ("schnell", "sigma_sqrt"),
                                         ("dev", "mode"), ("dev", "cosmap"), ("dev", "none")])
def test_loss_equals_the_diffusers_flux_script(request, kind, scheme):
    """schnell (static shift, no guidance): the script as it is. dev (guidance 2.0, dynamic shift): the script
    with the sigma table inference uses at this size (the documented difference, tested on its own below)."""
    from diffusers import FluxPipeline

    path = request.getfixturevalue(kind)
    pipe = FluxPipeline.from_pretrained(str(path))
    pixels, noise, u = fixed_batch(scheme)
    copy = pipe.scheduler if kind == "schnell" else shifted_copy(pipe, (16 // 2) * (24 // 2))
    with torch.no_grad():
        expected = script_loss(pipe, pixels, PROMPTS, noise, u, scheme, copy, guidance_scale=2.0)
    ours, _ = difftrain_loss(path, pixels, PROMPTS, noise, u, scheme, guidance_scale=2.0)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    if kind == "dev":  # the guidance embedding is live: another scale is another loss
        other, _ = difftrain_loss(path, pixels, PROMPTS, noise, u, scheme, guidance_scale=3.5)
        assert not torch.allclose(other, ours)


def test_training_uses_the_inference_shift_per_bucket_unlike_the_scripts_unshifted_sigmas(dev):
    """The documented difference: FLUX.1-dev's scheduler shifts dynamically, so diffusers' script trains on its
    unshifted table while inference shifts by resolution. difftrain trains each latent size with the sigmas
    FlowMatchEulerDiscreteScheduler.set_timesteps(mu=calculate_shift(packed tokens)) gives at inference."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = FluxPipeline.from_pretrained(str(dev))
    config = pipe.scheduler.config
    indices = torch.tensor([0, 100, 250, 500, 750, 900, 999])
    unshifted = (1000 - indices).float() / 1000
    pixels, noise, u = fixed_batch("none")
    ours, schedule = difftrain_loss(dev, pixels, PROMPTS, noise, u, "none", guidance_scale=3.5)
    script = FlowMatchEulerDiscreteScheduler.from_pretrained(str(dev), subfolder="scheduler")
    torch.testing.assert_close(script.sigmas[indices], unshifted)  # what the script trains with, at any size
    by_size = {}
    for latent in ((16, 16), (16, 24), (8, 8)):
        tokens = (latent[0] // 2) * (latent[1] // 2)
        inference = FlowMatchEulerDiscreteScheduler.from_config(config)
        inference.set_timesteps(sigmas=unshifted.tolist(), mu=calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift))
        schedule.select(latent)
        by_size[latent] = schedule.sigma(indices)
        torch.testing.assert_close(by_size[latent], inference.sigmas[:-1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(schedule.model_timesteps(indices), 1000 * by_size[latent])
    assert (by_size[16, 24][1:] > by_size[16, 16][1:]).all() and (by_size[16, 16][1:] > unshifted[1:]).all()
    assert (unshifted[1:] < by_size[8, 8][1:]).all() and (by_size[8, 8][1:] < by_size[16, 16][1:]).all()
    with torch.no_grad():
        verbatim = script_loss(pipe, pixels, PROMPTS, noise, u, "none", script, guidance_scale=3.5)
    assert not torch.allclose(ours, verbatim, rtol=1e-3)  # the script's unshifted training is another loss


def test_lora_on_the_transformer_two_buckets_cached_bf16(tmp_path, dev, images):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(flux_config(run, dev, images, "lora=on", "lora.rank=2", "lora.alpha=4", "optimizer.lr=0.01",
                             "trainer.mixed_precision=bf16", "data.cache_latents=true", "trainer.max_steps=3",
                             "trainer.checkpoint_every=0", "ema=none", "loss_weighting=cosmap"))
    tensors, meta = lora_file(run)
    assert {k.split(".")[0] for k in tensors} == {"transformer"}
    base = FluxPipeline.from_pretrained(str(dev))
    names = dict(base.transformer.named_modules())
    expected = {n for n, m in names.items() if isinstance(m, torch.nn.Linear) and n.endswith(TRANSFORMER_TARGETS)}
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors} == expected
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert any(n.startswith("single_transformer_blocks.") for n in expected)  # attn.to_q/k/v of single blocks
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 4
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)
    text = cache_tensors(run, "text")
    assert text["0.encoder_hidden_states"].shape == (16, 32) and text["0.pooled_projections"].shape == (32,)
    before = _generate(base)
    base.load_lora_weights(str(run / "final"))
    (adapter,) = base.transformer.peft_config
    loaded = get_peft_model_state_dict(base.transformer, adapter_name=adapter)
    assert loaded.keys() == {k.removeprefix("transformer.") for k in tensors}
    assert all(torch.equal(v, tensors[f"transformer.{k}"]) for k, v in loaded.items())
    assert not torch.allclose(_generate(base), before, atol=1e-4)  # the LoRA changes the output
    info = json.loads((run / "final" / "difftrain.json").read_text())
    assert info["family"] == "flux" and info["lora"] and info["prediction_type"] == "flow"


def test_lora_with_the_clip_encoder_uncached_without_guidance(tmp_path, schnell, images):
    from diffusers import FluxPipeline

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(flux_config(run, schnell, images, "lora=on", "lora.train_text_encoder=true", "optimizer.lr=0.01",
                             "trainer.max_steps=2", "trainer.checkpoint_every=0", "ema=none",
                             "weighting_scheme=logit_normal", "trainer.gradient_checkpointing=true"))
    tensors, meta = lora_file(run)
    assert {k.split(".")[0] for k in tensors} == {"transformer", "text_encoder"}
    assert all(k.removeprefix("text_encoder.").startswith("text_model.") for k in tensors if k.startswith("text_e"))
    assert meta["text_encoder.r"] == 4
    assert not (run / "cache").exists() or not list((run / "cache").glob("text-*"))
    pipe = FluxPipeline.from_pretrained(str(schnell))
    pipe.load_lora_weights(str(run / "final"))
    assert pipe.text_encoder.peft_config  # the CLIP adapter loaded too
    _generate(pipe)


def test_full_finetune_resumes_bitwise_and_loads_as_a_flux_pipeline(tmp_path, dev, images, monkeypatch):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    from difftrain.engine.run import run_training
    from difftrain.families.flux import FluxFamily
    from difftrain.families.protocol import SampleRequest

    schedules = []
    real = FluxFamily.training_schedule
    monkeypatch.setattr(FluxFamily, "training_schedule", lambda self, c: schedules.append(real(self, c)) or schedules[-1])
    extra = ("data.cache_latents=true", "data.random_flip=true", "trainer.checkpoints_total_limit=null",
             "weighting_scheme=logit_normal", "loss_weighting=sigma_sqrt", "loss_weighting.max_weight=100")
    full = tmp_path / "full"
    cfg = flux_config(full, dev, images, *extra)
    run_training(cfg)
    assert set(schedules[0]._by_size) == {(16, 16), (20, 12)}  # both buckets trained, each with its own shift
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    run_training(flux_config(part, dev, images, *extra, "resume=latest"))
    assert losses(full) == losses(part)
    for sub in ("transformer", "transformer_raw"):
        a = load_file(str(full / "final" / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(part / "final" / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = FluxPipeline.from_pretrained(str(full / "final"))
    assert pipe.scheduler.config.use_dynamic_shifting  # the pipeline's own scheduler
    _generate(pipe)
    raw = FluxTransformer2DModel.from_pretrained(str(full / "final" / "transformer_raw"))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), raw.parameters()))
    finished = FluxFamily.load_finished(full, cfg, "cpu", None)  # what `difftrain sample` runs
    images_out, _ = finished.generate(SampleRequest(prompts=("a red cat",), per_condition=1, steps=2, size=(24, 40)))
    assert images_out.shape == (1, 3, 24, 40) and images_out.abs().max() <= 1


def _generate(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    return out


# ---- config ------------------------------------------------------------------------------------------------
def test_flux_config_defaults_and_size_multiple(tmp_path, dev, images):
    from difftrain.cli.train import compose_config
    from difftrain.config.schema_t2i import FluxModelConfig
    from difftrain.config.validate import validate
    from difftrain.families.flux import FluxFamily

    cfg = validate(compose_config(["model=flux", f"model.pretrained={dev}", "data=imagefolder",
                                   f"data.path={images}"]))
    assert cfg["scheduler"]["name"] == "sd3" and cfg["weighting_scheme"]["name"] == "uniform"
    assert cfg["data"]["resolution"] == 1024
    assert {k: cfg["model"][k] for k in ("max_sequence_length", "guidance_scale")} == {
        "max_sequence_length": 512, "guidance_scale": 3.5}
    assert FluxFamily.size_multiple_of(FluxModelConfig(pretrained=str(dev))) == 8  # lcm(2x VAE * 2x2 packing, 8)
    real = tmp_path / "flux_like"  # FLUX.1's configs: an 8x VAE (4 levels), patch 1 -> 16
    for part, config in (("vae", {"block_out_channels": [128, 256, 512, 512]}), ("transformer", {"patch_size": 1})):
        (real / part).mkdir(parents=True)
        (real / part / "config.json").write_text(json.dumps(config))
    assert FluxFamily.size_multiple_of(FluxModelConfig(pretrained=str(real))) == 16


def test_flux_with_a_ddpm_scheduler_exits_2(dev, images):
    import subprocess
    import sys

    from conftest import cli_env

    result = subprocess.run([sys.executable, "-m", "difftrain", "train", "model=flux", f"model.pretrained={dev}",
                             "scheduler=ddpm", "data=imagefolder", f"data.path={images}"],
                            capture_output=True, text=True, env=cli_env(), timeout=60)
    assert result.returncode == 2
    assert "model=flux cannot train with scheduler=ddpm: FLUX.1 is a rectified-flow model: use scheduler=sd3" \
        in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_another_pipeline_names_its_model_option(pipes):
    from tiny_pipes import pipeline_dir

    from difftrain import registry
    from difftrain.errors import UserError

    sd3 = pipeline_dir("sd3", pipes)
    with pytest.raises(UserError, match="is a StableDiffusion3Pipeline pipeline, but model=flux trains FluxPipeline; "
                                        "use model=sd3"):
        registry.build("model", {"name": "flux", "pretrained": str(sd3), "revision": None, "variant": None,
                                 "resolution": 32, "max_sequence_length": 16, "guidance_scale": 3.5})
