"""model=flux: FLUX.1 (FluxTransformer2DModel + CLIP text encoder (pooled) + T5 + AutoencoderKL, 16 channels).

Latents: (z - shift_factor) * scaling_factor with the VAE's own factors (FLUX.1: 0.1159, 0.3611). The objective
works on unpacked latents (B, C, H, W); packing is a permutation, so noise, x_t and the target eps - x0 stay
unpacked and `call_flux` packs x_t into 2x2 patches as FluxPipeline._pack_latents does, builds img_ids from its
shape (every bucket its own), txt_ids = zeros, calls the transformer with timestep/1000 (= sigma) and the
guidance embedding (`model.guidance_scale`, only when transformer.config.guidance_embeds: FLUX.1-dev), and
unpacks the prediction (FluxPipeline._unpack_latents). The loss is then the one diffusers'
train_dreambooth_lora_flux.py computes (tests/t2i/test_flux.py compares them).

Training scheduler: the pipeline's FlowMatchEulerDiscreteScheduler. With `use_dynamic_shifting` (FLUX.1-dev)
every latent size trains with the shift inference gives it (components/flow_shift.py: mu = calculate_shift of the
packed token count); diffusers' script draws unshifted sigmas instead (docs/fine-tuning-flux.md). Without it
(FLUX.1-schnell) the scheduler's static `shift` applies, as for SD3. Prompts are encoded as
FluxPipeline.encode_prompt does: CLIP's pooler_output (77 tokens) and T5's last hidden state
(`model.max_sequence_length` tokens, no mask).
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
from difftrain.families.sd3 import flow_training_schedule
from difftrain.families.t2i import LatentTextToImage, T2ISpec, pipeline_parts, pixel_multiple
from difftrain.families.t2i_finished import FinishedPipeline

PIPELINE_CLASSES = ("FluxPipeline",)
PACK = 2  # FluxPipeline packs 2x2 latent patches into one token
LORA_TEXT_ENCODERS = ("text_encoder",)  # the CLIP encoder; T5 gets no adapters (as in diffusers' script)
TRANSFORMER_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2")


def tokenize_flux(tokenizers: dict, encoders: dict, captions: list[str], max_sequence_length: int
                  ) -> dict[str, torch.Tensor]:
    clip = tokenizers["tokenizer"]
    return {"text_encoder": clip(captions, padding="max_length", max_length=clip.model_max_length, truncation=True,
                                 return_tensors="pt").input_ids,
            "text_encoder_2": tokenizers["tokenizer_2"](captions, padding="max_length", truncation=True,
                                                        max_length=max_sequence_length, return_tensors="pt").input_ids}


def encode_flux(encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
    """T5 last hidden state (B, L, joint_attention_dim) and CLIP's pooler_output (B, pooled_projection_dim)."""
    pooled = encoders["text_encoder"](ids["text_encoder"], output_hidden_states=False).pooler_output
    states = encoders["text_encoder_2"](ids["text_encoder_2"], output_hidden_states=False)[0]
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): one row-major token per 2x2 patch, features ordered (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of (height, width)."""
    b, _, features = tokens.shape
    c = features // (PACK * PACK)
    return tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c, height, width)


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """(H/2 * W/2, 3) positions of the packed tokens: 0, row, column (FluxPipeline._prepare_latent_image_ids)."""
    rows, cols = height // PACK, width // PACK
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


def call_flux(transformer, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, guidance_scale: float
              ) -> torch.Tensor:
    """Pack x_t, call the transformer at sigma = timesteps / 1000 (it multiplies by 1000), unpack its output."""
    _, _, height, width = x.shape
    states = cond["encoder_hidden_states"]
    guidance = None
    if transformer.config.guidance_embeds:  # guidance-distilled (FLUX.1-dev); schnell-style models have none
        guidance = torch.full((x.shape[0],), float(guidance_scale), device=x.device, dtype=torch.float32)
    out = transformer(hidden_states=pack(x), timestep=timesteps / 1000, guidance=guidance,
                      pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3, device=x.device),
                      img_ids=image_ids(height, width, x.device), return_dict=False)[0]
    return unpack(out, height, width)


def pipeline_flux(vae, tokenizers: dict, encoders: dict, transformer, scheduler):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                        text_encoder=encoders.get("text_encoder"), tokenizer=tokenizers["tokenizer"],
                        text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=tokenizers["tokenizer_2"])


def prompt_kwargs_flux(cond: dict, negative: dict) -> dict:
    """FLUX.1 samples without a negative prompt (true CFG is off unless true_cfg_scale > 1)."""
    return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"]}


def save_lora_flux(folder: Path, model) -> None:
    """peft keys (transformer.…to_q.lora_A.weight, text_encoder.text_model.…q_proj.lora_B.weight)."""
    from diffusers import FluxPipeline

    lora_io.save_pipeline_lora(folder, model, FluxPipeline, "transformer", LORA_TEXT_ENCODERS, diffusers_keys=False)


def export_scheduler_flux(inference_scheduler, schedule):
    """The pipeline's own scheduler (its dynamic shift is what training used)."""
    return type(inference_scheduler).from_config(inference_scheduler.config)


class FluxFamily(ForwardsToLatentTextToImage):
    """ModelFamily of model=flux (registry target); LatentTextToImage does the shared work."""

    def __init__(self, options) -> None:
        """`options`: config/schema_t2i.py FluxModelConfig (a hub id or local pipeline folder)."""
        source = resolve_source(options.pretrained, options.revision, options.variant)
        index = read_model_index(source, PIPELINE_CLASSES, "flux")
        parts = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        components = {part: load_component(index, part, source) for part in parts}
        transformer = components["transformer"]
        length = options.max_sequence_length
        spec = T2ISpec(name="flux", denoiser="transformer", lora_text_encoders=LORA_TEXT_ENCODERS,
                       lora_targets=TRANSFORMER_LORA_TARGETS,
                       latent_multiple=PACK * int(transformer.config.patch_size),
                       tokenize=partial(tokenize_flux, max_sequence_length=length), encode=encode_flux,
                       call_denoiser=partial(call_flux, guidance_scale=options.guidance_scale),
                       pipeline=pipeline_flux, prompt_kwargs=prompt_kwargs_flux, save_lora=save_lora_flux,
                       export_scheduler=export_scheduler_flux, text_options={"max_sequence_length": length})
        self.name = options.name
        self.t2i = LatentTextToImage(spec, pipeline_parts(source, index, components, "transformer"), options)
        self.module = self.t2i.module

    def training_schedule(self, configured):
        """The pipeline's flow-matching scheduler: per latent size the shift inference uses when it shifts
        dynamically (FLUX.1-dev), else its static shift; only precondition_outputs is configured."""
        from difftrain.components.flow_shift import ResolutionShiftedFlowSchedule

        dynamic = self.t2i.inference_scheduler.config.get("use_dynamic_shifting")
        per_size = (lambda scheduler: ResolutionShiftedFlowSchedule(scheduler, packed_tokens)) if dynamic else None
        return flow_training_schedule(self.t2i.inference_scheduler, configured, per_size)

    @classmethod
    def size_multiple_of(cls, options) -> int:
        """Image sides are multiples of this (VAE factor x 2x2 packing x patch size; 16 for FLUX.1)."""
        source = resolve_source(options.pretrained, options.revision, options.variant)
        patch = int(component_config(source, "transformer").get("patch_size", 1))
        return pixel_multiple(downsampling(component_config(source, "vae")), PACK * patch)

    @classmethod
    def load_finished(cls, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedPipeline:
        """final/ (a whole pipeline, or the run's LoRA file on the base pipeline), prompts encoded to the
        run's model.max_sequence_length T5 tokens; checkpoints are not read."""
        return FinishedPipeline(run_dir, cfg, device,
                                {"max_sequence_length": cfg["model"]["max_sequence_length"]})


def packed_tokens(size: tuple[int, int]) -> int:
    """Image tokens of latents of `size` (h, w): what FluxPipeline passes calculate_shift."""
    return (size[0] // PACK) * (size[1] // PACK)
