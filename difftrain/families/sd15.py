"""model=sd15: Stable Diffusion 1.x/2.x (UNet2DConditionModel + CLIP text encoder + AutoencoderKL).

Training scheduler: DDPMScheduler built from the pipeline's own scheduler config (its betas and number of
timesteps) with the `scheduler` group's prediction_type (ddpm: epsilon, ddpm_v: v_prediction) and
rescale_betas_zero_snr; the group's num_train_timesteps, beta_* and clip_sample are not used. The saved
inference scheduler is the pipeline's (e.g. PNDM) with the trained prediction type.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.families import lora as lora_io
from difftrain.families.latent_family import ForwardsToLatentTextToImage
from difftrain.families.loading import (
    component_config,
    downsampling,
    load_component,
    read_model_index,
    resolve_source,
)
from difftrain.families.t2i import LatentTextToImage, T2ISpec, pipeline_parts, pixel_multiple
from difftrain.families.t2i_finished import FinishedPipeline

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def tokenize_sd15(tokenizers: dict, encoders: dict, captions: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = tokenizers["tokenizer"]
    out = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    ids = {"text_encoder": out.input_ids}
    encoder = encoders.get("text_encoder")
    if encoder is not None and getattr(encoder.config, "use_attention_mask", False):
        ids["attention_mask"] = out.attention_mask
    return ids


def encode_sd15(encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
    """Last hidden state of the CLIP text encoder (what StableDiffusionPipeline.encode_prompt returns)."""
    encoder = encoders["text_encoder"]
    mask = ids.get("attention_mask")
    return {"encoder_hidden_states": encoder(ids["text_encoder"], attention_mask=mask, return_dict=False)[0]}


def call_unet(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    return unet(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


def pipeline_sd15(vae, tokenizers: dict, encoders: dict, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=encoders.get("text_encoder"),
                                   tokenizer=tokenizers["tokenizer"], unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def prompt_kwargs_sd15(cond: dict, negative: dict) -> dict:
    return {"prompt_embeds": cond["encoder_hidden_states"],
            "negative_prompt_embeds": negative["encoder_hidden_states"]}


def save_lora_sd15(folder: Path, model) -> None:
    """diffusers' legacy keys (unet.…to_q.lora.down.weight), what the SD 1.x/2.x loaders expect."""
    from diffusers import StableDiffusionPipeline

    lora_io.save_pipeline_lora(folder, model, StableDiffusionPipeline, "unet", ("text_encoder",), diffusers_keys=True)


def export_scheduler_sd15(inference_scheduler, schedule):
    """The pipeline's scheduler with the trained prediction type (zero-terminal-SNR: trailing spacing)."""
    overrides = {"prediction_type": schedule.prediction_type}
    if schedule.scheduler.config.get("rescale_betas_zero_snr"):
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return type(inference_scheduler).from_config(inference_scheduler.config, **overrides)


def ddpm_training_schedule(inference_scheduler, configured):
    """DDPMScheduler on the pipeline scheduler's betas with the configured prediction type (and zero terminal
    SNR): the training schedule of the UNet families (sd15, sdxl)."""
    from diffusers import DDPMScheduler

    from difftrain.components.noise_schedules import schedule_from_scheduler

    overrides = {"prediction_type": configured.prediction_type}
    if configured.scheduler.config.get("rescale_betas_zero_snr"):
        overrides["rescale_betas_zero_snr"] = True
    scheduler = DDPMScheduler.from_config(inference_scheduler.config, **overrides)
    schedule = schedule_from_scheduler(scheduler, configured.prediction_type)
    schedule.precondition_outputs = False
    return schedule


class SD15Family(ForwardsToLatentTextToImage):
    """ModelFamily of model=sd15 (registry target); LatentTextToImage does the shared work."""

    def __init__(self, options) -> None:
        """`options`: config/schema_t2i.py SD15ModelConfig (a hub id or local pipeline folder)."""
        name = options.name
        source = resolve_source(options.pretrained, options.revision, options.variant)
        index = read_model_index(source, PIPELINE_CLASSES, "sd15")
        components = {part: load_component(index, part, source)
                      for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
        unet = components["unet"]
        spec = T2ISpec(name="sd15", denoiser="unet", lora_text_encoders=("text_encoder",),
                       lora_targets=UNET_LORA_TARGETS, latent_multiple=downsampling(unet.config),
                       tokenize=tokenize_sd15, encode=encode_sd15, call_denoiser=call_unet, pipeline=pipeline_sd15,
                       prompt_kwargs=prompt_kwargs_sd15, save_lora=save_lora_sd15,
                       export_scheduler=export_scheduler_sd15)
        self.name = name
        self.t2i = LatentTextToImage(spec, pipeline_parts(source, index, components, "unet"), options)
        self.module = self.t2i.module

    def training_schedule(self, configured):
        """DDPM on the pipeline's betas with the configured prediction type (and zero terminal SNR)."""
        return ddpm_training_schedule(self.t2i.inference_scheduler, configured)

    @classmethod
    def size_multiple_of(cls, options) -> int:
        """Image sides are multiples of this (VAE factor x UNet downsampling), from the config files only."""
        source = resolve_source(options.pretrained, options.revision, options.variant)
        return pixel_multiple(downsampling(component_config(source, "vae")), downsampling(component_config(source, "unet")))

    @classmethod
    def load_finished(cls, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedPipeline:
        """final/ (a whole pipeline, or the run's LoRA file on the base pipeline); checkpoints are not read."""
        return FinishedPipeline(run_dir, cfg, device)
