"""model=sdxl: Stable Diffusion XL (UNet2DConditionModel + CLIP-L + CLIP-bigG with projection + AutoencoderKL).

Prompts are encoded as StableDiffusionXLPipeline.encode_prompt does: the penultimate hidden states of both CLIP
encoders concatenated on features (`encoder_hidden_states`), and the projected pooled output of encoder 2
(`text_embeds`). Micro-conditioning (`time_ids`, per sample, float32: bf16 would store 3000 as 3008) is
(original h, w) + (crop top, left) + (target h, w) from the data batch (`micro_conditioning`), where the crop
is measured in the image the UNet sees: a flipped sample's left offset is mirrored (resized_w - left - target_w),
which is what diffusers' train_text_to_image_sdxl.py gets by flipping before it crops.

Training scheduler: as sd15 (`ddpm_training_schedule`): DDPM on the pipeline's betas with the `scheduler`
group's prediction_type and rescale_betas_zero_snr. The VAE (the pipeline's, or `model.vae`) stays fp32 unless
`model.vae_dtype=weight`; a full fine-tune's final/ holds that VAE. Validation grids use zero negative
embeddings when the pipeline has force_zeros_for_empty_prompt (what `difftrain sample` gets from the pipeline).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from difftrain.errors import UserError
from difftrain.families import lora as lora_io
from difftrain.families.latent_family import ForwardsToLatentTextToImage
from difftrain.families.loading import (
    component_config,
    downsampling,
    load_component,
    read_model_index,
    resolve_source,
)
from difftrain.families.sd15 import (
    UNET_LORA_TARGETS,
    SD15Family,
    ddpm_training_schedule,
    export_scheduler_sd15,
)
from difftrain.families.t2i import LatentTextToImage, T2ISpec, pipeline_parts
from difftrain.families.t2i_finished import FinishedPipeline

PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)
LORA_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def tokenize_sdxl(tokenizers: dict, encoders: dict, captions: list[str]) -> dict[str, torch.Tensor]:
    ids = {}
    for encoder, name in ENCODERS:
        tokenizer = tokenizers[name]
        ids[encoder] = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
    return ids


def encode_sdxl(encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
    """Penultimate hidden states of both encoders, concatenated; encoder 2's projected pooled output."""
    first = encoders["text_encoder"](ids["text_encoder"], output_hidden_states=True)
    second = encoders["text_encoder_2"](ids["text_encoder_2"], output_hidden_states=True)
    return {"encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
            "text_embeds": second[0]}


def micro_conditioning(batch: dict) -> dict[str, torch.Tensor]:
    """`time_ids` (B, 6) float32: original (h, w), crop (top, left) in the (flipped) image, target (h, w).

    The data crops at (top, left) of the resized image and then flips the crop, so a flipped sample is the
    crop of the flipped resized image at left' = resized_w - left - target_w."""
    original = batch["original_sizes"].long()
    crop = batch["crop_offsets"].long().clone()
    height, width = (int(v) for v in batch["target_size"])
    flips = batch.get("flips")
    if flips is not None:
        mirrored = batch["resized_sizes"][:, 1].long() - crop[:, 1] - width
        crop[:, 1] = torch.where(flips.bool(), mirrored, crop[:, 1])
    target = torch.tensor([height, width], dtype=torch.long).expand(original.shape[0], 2)
    return {"time_ids": torch.cat([original, crop, target], dim=1).float()}


def call_unet_sdxl(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(x, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
                return_dict=False)[0]


def pipeline_sdxl(vae, tokenizers: dict, encoders: dict, unet, scheduler, force_zeros: bool = True):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders.get("text_encoder"), text_encoder_2=encoders.get("text_encoder_2"),
        tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"], unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)


def prompt_kwargs_sdxl(cond: dict, negative: dict, force_zeros: bool = True) -> dict:
    """The empty negative prompt as the pipeline makes it: zeros with force_zeros_for_empty_prompt."""
    negative = {k: torch.zeros_like(v) for k, v in negative.items()} if force_zeros else negative
    return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["text_embeds"],
            "negative_prompt_embeds": negative["encoder_hidden_states"],
            "negative_pooled_prompt_embeds": negative["text_embeds"]}


def save_lora_sdxl(folder: Path, model) -> None:
    """diffusers' keys as train_text_to_image_lora_sdxl.py writes them (unet.…, text_encoder.…, text_encoder_2.…)."""
    from diffusers import StableDiffusionXLPipeline

    lora_io.save_pipeline_lora(folder, model, StableDiffusionXLPipeline, "unet", LORA_TEXT_ENCODERS, diffusers_keys=True)


def load_vae(name: str):
    """`model.vae`: an AutoencoderKL folder (config.json, or a pipeline folder's vae/) or hub id, in float32."""
    from diffusers import AutoencoderKL

    local = Path(name).expanduser()
    subfolder = None
    if local.is_dir():
        if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
            subfolder = "vae"
        elif not (local / "config.json").is_file():
            raise UserError(f"model.vae '{name}' has no config.json (nor vae/config.json): give an AutoencoderKL "
                            "folder written by vae.save_pretrained(folder), a pipeline folder or a hub id")
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.is_dir() else name, subfolder=subfolder,
                                            dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 (OSError, ValueError, safetensors and hub errors)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"could not load model.vae='{name}' as an AutoencoderKL ({type(exc).__name__}: {first}); "
                        "give a local VAE folder or a reachable hub id (e.g. madebyollin/sdxl-vae-fp16-fix), or "
                        "model.vae=null for the pipeline's own") from None
    return vae.eval()


class SDXLFamily(ForwardsToLatentTextToImage):
    """ModelFamily of model=sdxl (registry target); LatentTextToImage does the shared work."""

    def __init__(self, options) -> None:
        """`options`: config/schema_t2i.py SDXLModelConfig (a hub id or local pipeline folder)."""
        source = resolve_source(options.pretrained, options.revision, options.variant)
        index = read_model_index(source, PIPELINE_CLASSES, "sdxl")
        self.vae_name, self.vae_override = options.vae, options.vae is not None
        parts = ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        components = {part: load_component(index, part, source) for part in parts}
        if self.vae_override:  # the pipeline's own VAE is not loaded; only its config is compared
            vae, expected = load_vae(options.vae), downsampling(component_config(source, "vae"))
            if downsampling(vae.config) != expected:
                raise UserError(f"model.vae='{options.vae}' downsamples by {downsampling(vae.config)}, the pipeline's "
                                f"VAE by {expected}: use a VAE made for SDXL (or model.vae=null)")
            components["vae"] = vae
        else:
            components["vae"] = load_component(index, "vae", source)
        if components["vae"].config.get("latents_mean") is not None:
            raise UserError("this VAE normalises latents with latents_mean/latents_std, which model=sdxl does not "
                            "support; use an SDXL VAE with scaling_factor only (or model.vae=<another VAE>)")
        unet = components["unet"]
        if unet.config.get("addition_embed_type") != "text_time":
            raise UserError(f"{source.describe()}: its UNet has addition_embed_type="
                            f"{unet.config.get('addition_embed_type')!r}, not 'text_time', so it is not an SDXL UNet")
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        spec = T2ISpec(name="sdxl", denoiser="unet", lora_text_encoders=LORA_TEXT_ENCODERS,
                       lora_targets=UNET_LORA_TARGETS, latent_multiple=downsampling(unet.config),
                       tokenize=tokenize_sdxl, encode=encode_sdxl, call_denoiser=call_unet_sdxl,
                       pipeline=partial(pipeline_sdxl, force_zeros=force_zeros),
                       prompt_kwargs=partial(prompt_kwargs_sdxl, force_zeros=force_zeros), save_lora=save_lora_sdxl,
                       export_scheduler=export_scheduler_sd15, batch_conditioning=micro_conditioning,
                       vae_dtype=torch.float32 if options.vae_dtype == "fp32" else None)
        parts = pipeline_parts(source, index, components, "unet")
        if self.vae_override:  # the exported pipeline is reloaded with the VAE that trained
            parts = replace(parts, null_components={**parts.null_components, "vae": components["vae"]})
        self.name = options.name
        self.t2i = LatentTextToImage(spec, parts, options)
        self.module = self.t2i.module

    def training_schedule(self, configured):
        """DDPM on the pipeline's betas with the configured prediction type (and zero terminal SNR), as sd15."""
        return ddpm_training_schedule(self.t2i.inference_scheduler, configured)

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        """As LatentTextToImage.export; a `model.vae` goes into final/vae as loaded (float32), whatever dtype
        it ran in (a VAE cast to bf16 and back would not be the one named)."""
        if self.vae_override and self.t2i.vae_dtype != torch.float32:
            self.t2i.null_components = {**self.t2i.null_components, "vae": load_vae(self.vae_name)}
        self.t2i.export(final_dir, model, ema, schedule)

    @classmethod
    def size_multiple_of(cls, options) -> int:
        """As sd15: VAE factor x UNet downsampling, from the config files only."""
        return SD15Family.size_multiple_of(options)

    @classmethod
    def load_finished(cls, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedPipeline:
        """final/ (a whole pipeline, or the run's LoRA file on the base pipeline with the run's model.vae)."""
        return FinishedSDXL(run_dir, cfg, device)


class FinishedSDXL(FinishedPipeline):
    """A LoRA run trained with `model.vae` generates with that VAE too (a full run's final/ holds it already)."""

    def pipeline(self):
        if self._pipe is None:
            pipe = super().pipeline()
            name = self.cfg["model"].get("vae")
            if name and not (self.run_dir / "final" / "model_index.json").is_file():
                pipe.vae = load_vae(name).to(self.device, self.dtype)
        return self._pipe
