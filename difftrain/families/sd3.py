"""model=sd3: Stable Diffusion 3 (SD3Transformer2DModel + 2 CLIP-with-projection + T5 + AutoencoderKL).

Training scheduler: the pipeline's FlowMatchEulerDiscreteScheduler (its num_train_timesteps and shift) in
the FlowMatchSchedule adapter; from the `scheduler` group only precondition_outputs applies (num_train_timesteps
and shift come from the pipeline). Timesteps come from `weighting_scheme` (logit_normal, mode, uniform), per-sample
weights from `loss_weighting` (sigma_sqrt, cosmap, min_snr, none). Prompts are encoded as
StableDiffusion3Pipeline.encode_prompt does: CLIP penultimate hidden states (concatenated, zero-padded to the T5
width) followed by the T5 states, and the two pooled CLIP projections concatenated; a pipeline without T5 gets
zeros in its place.
"""

from __future__ import annotations

from functools import partial
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

PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
LORA_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TRANSFORMER_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                            "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")


def tokenize_sd3(tokenizers: dict, encoders: dict, captions: list[str], max_sequence_length: int
                 ) -> dict[str, torch.Tensor]:
    ids = {}
    for encoder, name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer = tokenizers[name]
        ids[encoder] = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
    if "tokenizer_3" in tokenizers:
        ids["text_encoder_3"] = tokenizers["tokenizer_3"](
            captions, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt").input_ids
    return ids


def _clip(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_sd3(encoders: dict, ids: dict, t5_length: int, joint_dim: int) -> dict[str, torch.Tensor]:
    h1, pooled1 = _clip(encoders["text_encoder"], ids["text_encoder"])
    h2, pooled2 = _clip(encoders["text_encoder_2"], ids["text_encoder_2"])
    t5_encoder = encoders.get("text_encoder_3")
    if t5_encoder is not None:
        t5 = t5_encoder(ids["text_encoder_3"])[0]
    else:
        t5 = torch.zeros(h1.shape[0], t5_length, joint_dim, dtype=h1.dtype, device=h1.device)
    clip = torch.cat([h1, h2], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat([pooled1, pooled2], dim=-1)}


def call_transformer(transformer, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


def pipeline_sd3(vae, tokenizers: dict, encoders: dict, transformer, scheduler):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=encoders.get("text_encoder"), tokenizer=tokenizers["tokenizer"],
        text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=tokenizers["tokenizer_2"],
        text_encoder_3=encoders.get("text_encoder_3"), tokenizer_3=tokenizers.get("tokenizer_3"))


def prompt_kwargs_sd3(cond: dict, negative: dict) -> dict:
    return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
            "negative_prompt_embeds": negative["encoder_hidden_states"],
            "negative_pooled_prompt_embeds": negative["pooled_projections"]}


def save_lora_sd3(folder: Path, model) -> None:
    """peft keys (transformer.…to_q.lora_A.weight), what the SD3 loader expects."""
    from diffusers import StableDiffusion3Pipeline

    lora_io.save_pipeline_lora(folder, model, StableDiffusion3Pipeline, "transformer", LORA_TEXT_ENCODERS,
                               diffusers_keys=False)


def export_scheduler_sd3(inference_scheduler, schedule):
    return type(inference_scheduler).from_config(inference_scheduler.config)


def flow_training_schedule(inference_scheduler, configured, schedule_class=None):
    """The pipeline's flow-matching scheduler (its shift) as a training schedule; only
    `configured.precondition_outputs` is configured. `schedule_class(scheduler)` replaces the plain schedule
    (FLUX.1's per-resolution shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftrain.components.noise_schedules import schedule_from_scheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(inference_scheduler.config)
    schedule = schedule_class(scheduler) if schedule_class is not None else schedule_from_scheduler(scheduler)
    schedule.precondition_outputs = bool(configured.precondition_outputs)
    return schedule


class SD3Family(ForwardsToLatentTextToImage):
    """ModelFamily of model=sd3 (registry target); LatentTextToImage does the shared work."""

    def __init__(self, options) -> None:
        """`options`: config/schema_t2i.py SD3ModelConfig (a hub id or local pipeline folder)."""
        name, max_sequence_length = options.name, options.max_sequence_length
        source = resolve_source(options.pretrained, options.revision, options.variant)
        index = read_model_index(source, PIPELINE_CLASSES, "sd3")
        parts = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        components = {part: load_component(index, part, source) for part in parts}
        for part in ("text_encoder_3", "tokenizer_3"):  # SD3 runs without T5 (zeros in its place)
            components[part] = load_component(index, part, source, required=False)
        if (components["text_encoder_3"] is None) != (components["tokenizer_3"] is None):
            components["text_encoder_3"] = components["tokenizer_3"] = None
        transformer = components["transformer"]
        joint_dim = int(transformer.config.joint_attention_dim)
        spec = T2ISpec(name="sd3", denoiser="transformer", lora_text_encoders=LORA_TEXT_ENCODERS,
                       lora_targets=TRANSFORMER_LORA_TARGETS, latent_multiple=int(transformer.config.patch_size),
                       tokenize=partial(tokenize_sd3, max_sequence_length=max_sequence_length),
                       encode=partial(encode_sd3, t5_length=max_sequence_length, joint_dim=joint_dim),
                       call_denoiser=call_transformer, pipeline=pipeline_sd3, prompt_kwargs=prompt_kwargs_sd3,
                       save_lora=save_lora_sd3, export_scheduler=export_scheduler_sd3,
                       text_options={"max_sequence_length": max_sequence_length})
        self.name = name
        self.t2i = LatentTextToImage(spec, pipeline_parts(source, index, components, "transformer"), options)
        self.module = self.t2i.module

    def training_schedule(self, configured):
        return flow_training_schedule(self.t2i.inference_scheduler, configured)

    @classmethod
    def size_multiple_of(cls, options) -> int:
        """Image sides are multiples of this (VAE factor x transformer patch size), from the config files only."""
        source = resolve_source(options.pretrained, options.revision, options.variant)
        return pixel_multiple(downsampling(component_config(source, "vae")),
                              int(component_config(source, "transformer")["patch_size"]))

    @classmethod
    def load_finished(cls, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedPipeline:
        """final/ (a whole pipeline, or the run's LoRA file on the base pipeline), prompts encoded to the
        run's model.max_sequence_length T5 tokens; checkpoints are not read."""
        return FinishedPipeline(run_dir, cfg, device,
                                {"max_sequence_length": cfg["model"]["max_sequence_length"]})
