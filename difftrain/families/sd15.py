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
from difftrain.families.loading import load_component, read_model_index, resolve_source
from difftrain.families.t2i import T2IBundle

UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def encode_sd15(encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
    """Last hidden state of the CLIP text encoder (what StableDiffusionPipeline.encode_prompt returns)."""
    encoder = encoders["text_encoder"]
    mask = ids.get("attention_mask")
    return {"encoder_hidden_states": encoder(ids["text_encoder"], attention_mask=mask, return_dict=False)[0]}


def call_unet(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    return unet(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class SD15Bundle(T2IBundle):
    family = "sd15"
    denoiser_name = "unet"
    pipeline_classes = ("StableDiffusionPipeline",)
    lora_text_encoders = ("text_encoder",)
    default_lora_targets = UNET_LORA_TARGETS

    def training_schedule(self, scheduler_cfg: dict):
        from diffusers import DDPMScheduler

        from difftrain.components.noise_schedules import schedule_from_scheduler

        overrides = {"prediction_type": scheduler_cfg["prediction_type"]}
        if scheduler_cfg.get("rescale_betas_zero_snr"):
            overrides["rescale_betas_zero_snr"] = True
        scheduler = DDPMScheduler.from_config(self.inference_scheduler.config, **overrides)
        schedule = schedule_from_scheduler(scheduler, scheduler_cfg["prediction_type"])
        schedule.precondition_outputs = False
        return schedule

    def export_scheduler(self, schedule):
        overrides = {"prediction_type": schedule.prediction_type}
        if schedule.scheduler.config.get("rescale_betas_zero_snr"):
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return type(self.inference_scheduler).from_config(self.inference_scheduler.config, **overrides)

    def latent_multiple(self) -> int:
        return 2 ** (len(self.model.denoiser.config.block_out_channels) - 1)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizers["tokenizer"]
        out = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        ids = {"text_encoder": out.input_ids}
        encoder = (self.encoders() or {}).get("text_encoder")
        if encoder is not None and getattr(encoder.config, "use_attention_mask", False):
            ids["attention_mask"] = out.attention_mask
        return ids

    def pipeline(self, model, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.encoders(model).get("text_encoder"),
                                       tokenizer=self.tokenizers["tokenizer"], unet=model.denoiser,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def prompt_kwargs(self, cond: dict, negative: dict) -> dict:
        return {"prompt_embeds": cond["encoder_hidden_states"],
                "negative_prompt_embeds": negative["encoder_hidden_states"]}

    def save_lora(self, folder: Path, model) -> None:
        from diffusers import StableDiffusionPipeline

        layers = {"unet_lora_layers": lora_io.denoiser_layers(model.denoiser, True)}
        modules = {"unet": model.denoiser}
        if model.text_encoders is not None:
            encoder = model.text_encoders["text_encoder"]
            layers["text_encoder_lora_layers"] = lora_io.text_encoder_layers(encoder, True)
            modules["text_encoder"] = encoder
        StableDiffusionPipeline.save_lora_weights(str(folder), **layers, **lora_io.adapter_metadata(modules))


def build_sd15(name: str, pretrained: str, revision: str | None = None, variant: str | None = None,
               resolution: int = 512) -> SD15Bundle:
    source = resolve_source(pretrained, revision, variant)
    index = read_model_index(source, SD15Bundle.pipeline_classes, "sd15")
    components = {part: load_component(index, part, source)
                  for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    cfg = {"name": name, "pretrained": pretrained, "revision": revision, "variant": variant,
           "resolution": resolution}
    return SD15Bundle(source, index, components, cfg, encode_sd15, call_unet)
