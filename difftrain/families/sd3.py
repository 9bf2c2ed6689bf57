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
from difftrain.families.loading import load_component, read_model_index, resolve_source
from difftrain.families.t2i import T2IBundle

TRANSFORMER_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                            "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")


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


class SD3Bundle(T2IBundle):
    family = "sd3"
    denoiser_name = "transformer"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    lora_text_encoders = ("text_encoder", "text_encoder_2")
    default_lora_targets = TRANSFORMER_LORA_TARGETS

    def training_schedule(self, scheduler_cfg: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from difftrain.components.noise_schedules import schedule_from_scheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.inference_scheduler.config)
        schedule = schedule_from_scheduler(scheduler)
        schedule.precondition_outputs = bool(scheduler_cfg.get("precondition_outputs", False))
        return schedule

    def export_scheduler(self, schedule):
        return type(self.inference_scheduler).from_config(self.inference_scheduler.config)

    def latent_multiple(self) -> int:
        return int(self.model.denoiser.config.patch_size)

    def text_options(self) -> dict:
        return {"max_sequence_length": self.model_cfg["max_sequence_length"]}

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = {}
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            tok = self.tokenizers[tokenizer]
            ids[encoder] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids
        if "tokenizer_3" in self.tokenizers:
            ids["text_encoder_3"] = self.tokenizers["tokenizer_3"](
                captions, padding="max_length", max_length=self.model_cfg["max_sequence_length"], truncation=True,
                add_special_tokens=True, return_tensors="pt").input_ids
        return ids

    def pipeline(self, model, scheduler):
        from diffusers import StableDiffusion3Pipeline

        encoders = self.encoders(model)
        return StableDiffusion3Pipeline(
            transformer=model.denoiser, scheduler=scheduler, vae=self.vae,
            text_encoder=encoders.get("text_encoder"), tokenizer=self.tokenizers["tokenizer"],
            text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=self.tokenizers["tokenizer_2"],
            text_encoder_3=encoders.get("text_encoder_3"), tokenizer_3=self.tokenizers.get("tokenizer_3"))

    def prompt_kwargs(self, cond: dict, negative: dict) -> dict:
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
                "negative_prompt_embeds": negative["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": negative["pooled_projections"]}

    def save_lora(self, folder: Path, model) -> None:
        from diffusers import StableDiffusion3Pipeline

        layers = {"transformer_lora_layers": lora_io.denoiser_layers(model.denoiser, False)}
        modules = {"transformer": model.denoiser}
        if model.text_encoders is not None:
            for name in self.lora_text_encoders:
                layers[f"{name}_lora_layers"] = lora_io.text_encoder_layers(model.text_encoders[name], False)
                modules[name] = model.text_encoders[name]
        StableDiffusion3Pipeline.save_lora_weights(str(folder), **layers, **lora_io.adapter_metadata(modules))


def build_sd3(name: str, pretrained: str, revision: str | None = None, variant: str | None = None,
              resolution: int = 1024, max_sequence_length: int = 77) -> SD3Bundle:
    source = resolve_source(pretrained, revision, variant)
    index = read_model_index(source, SD3Bundle.pipeline_classes, "sd3")
    parts = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    components = {part: load_component(index, part, source) for part in parts}
    for part in ("text_encoder_3", "tokenizer_3"):  # SD3 runs without T5 (zeros in its place)
        components[part] = load_component(index, part, source, required=False)
    if (components["text_encoder_3"] is None) != (components["tokenizer_3"] is None):
        components["text_encoder_3"] = components["tokenizer_3"] = None
    cfg = {"name": name, "pretrained": pretrained, "revision": revision, "variant": variant,
           "resolution": resolution, "max_sequence_length": max_sequence_length}
    joint_dim = int(components["transformer"].config.joint_attention_dim)
    encode = partial(encode_sd3, t5_length=max_sequence_length, joint_dim=joint_dim)
    return SD3Bundle(source, index, components, cfg, encode, call_transformer)
