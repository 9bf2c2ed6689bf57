"""Schemas of the latent text-to-image options: model=sd15|sdxl|sd3, lora=none|on, data=hf.

Pure Python like schema.py. The pretrained-pipeline models share `PretrainedPipelineConfig`, whose class
attributes say what the family takes from the pipeline; the rules that reject the combinations without
meaning (a DDPM scheduler for SD3, cached text embeddings with a trained text encoder, a scheduler key the
pipeline overrides, ...) are in difftrain/config/rules.py; docs/fine-tuning-sd15.md and
docs/fine-tuning-sd3.md explain each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from difftrain.config.fields import opt
from difftrain.config.schema import CaptionedImageDataConfig

MISSING = "???"


def looks_like_path(value: str) -> bool:
    """A local path (./x, /x, ~/x, C:\\x, a/b/c) rather than a hub id 'org/name'."""
    return value.startswith((".", "/", "~", "\\")) or value.count("/") > 1 or "\\" in value or ":" in value


@dataclass(frozen=True)
class PretrainedPipelineConfig:
    """A model family loaded from a diffusers pipeline (hub id or folder); the rules of rules.py that name
    `model.pretrained`, the scheduler and the data apply to every option whose schema derives from this."""

    schedulers: ClassVar[tuple[str, ...]] = ()  # the scheduler options the family trains with
    scheduler_hint: ClassVar[str] = ""  # what to choose instead of another scheduler
    pipeline_scheduler_keys: ClassVar[tuple[str, ...]] = ()  # scheduler keys the pipeline's config supplies
    scheduler_keys_used: ClassVar[str] = ""  # what the scheduler group still sets, for the error message
    example: ClassVar[str] = ""  # a hub id for the "model.pretrained is required" message

    name: str = ""
    pretrained: str = opt(MISSING, "hub id or local folder of a diffusers pipeline")
    revision: str | None = opt(None, "hub revision (branch, tag or commit); null = main")
    variant: str | None = opt(None, "weight file variant to load, e.g. fp16 (training weights are fp32)")
    resolution: int = opt(512, "native resolution: the default of data.resolution for this model", ge=8)
    quantize_base: str = opt("none", "quantise the frozen denoiser under LoRA (QLoRA): none, nf4 (bitsandbytes, "
                                     "CUDA), int8 (torchao weight-only, CPU or GPU) or fp8 (torchao weight-only, "
                                     "GPU with compute capability >= 8.9); adapters stay fp32",
                             choices=("none", "nf4", "int8", "fp8"))
    vae_tiling: bool | None = opt(None, "encode images in overlapping tiles (less VAE memory, slightly different "
                                        "latents); null = when a bucket side exceeds 1536 px")


@dataclass(frozen=True)
class SD15ModelConfig(PretrainedPipelineConfig):
    schedulers: ClassVar[tuple[str, ...]] = ("ddpm", "ddpm_v")
    scheduler_hint: ClassVar[str] = "use scheduler=ddpm (epsilon) or scheduler=ddpm_v (v_prediction)"
    pipeline_scheduler_keys: ClassVar[tuple[str, ...]] = ("num_train_timesteps", "beta_schedule", "beta_start",
                                                          "beta_end", "clip_sample")
    scheduler_keys_used: ClassVar[str] = "only scheduler.prediction_type and scheduler.rescale_betas_zero_snr apply"
    example: ClassVar[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    name: str = "sd15"
    pretrained: str = opt(MISSING, "hub id or local folder of a StableDiffusionPipeline (SD 1.x / 2.x)")


@dataclass(frozen=True)
class SDXLModelConfig(PretrainedPipelineConfig):
    schedulers: ClassVar[tuple[str, ...]] = SD15ModelConfig.schedulers
    scheduler_hint: ClassVar[str] = SD15ModelConfig.scheduler_hint
    pipeline_scheduler_keys: ClassVar[tuple[str, ...]] = SD15ModelConfig.pipeline_scheduler_keys
    scheduler_keys_used: ClassVar[str] = SD15ModelConfig.scheduler_keys_used
    example: ClassVar[str] = "stabilityai/stable-diffusion-xl-base-1.0"

    name: str = "sdxl"
    pretrained: str = opt(MISSING, "hub id or local folder of a StableDiffusionXLPipeline")
    resolution: int = opt(1024, "native resolution: the default of data.resolution for this model", ge=8)
    vae: str | None = opt(None, "another AutoencoderKL (hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix); "
                                "null = the pipeline's")
    vae_dtype: str = opt("fp32", "dtype of the frozen VAE: fp32 (SDXL's VAE overflows in fp16) or weight (that "
                                 "of trainer.mixed_precision)", choices=("fp32", "weight"))


@dataclass(frozen=True)
class SD3ModelConfig(PretrainedPipelineConfig):
    schedulers: ClassVar[tuple[str, ...]] = ("sd3",)
    scheduler_hint: ClassVar[str] = "SD3 is a rectified-flow model: use scheduler=sd3"
    pipeline_scheduler_keys: ClassVar[tuple[str, ...]] = ("num_train_timesteps", "shift")
    scheduler_keys_used: ClassVar[str] = "only scheduler.precondition_outputs applies"
    example: ClassVar[str] = "stabilityai/stable-diffusion-3-medium-diffusers"

    name: str = "sd3"
    pretrained: str = opt(MISSING, "hub id or local folder of a StableDiffusion3Pipeline")
    resolution: int = opt(1024, "native resolution: the default of data.resolution for this model", ge=8)
    max_sequence_length: int = opt(77, "T5 tokens per prompt (training, caches and validation)", ge=1, le=512)


@dataclass(frozen=True)
class FluxModelConfig(PretrainedPipelineConfig):
    schedulers: ClassVar[tuple[str, ...]] = ("sd3",)
    scheduler_hint: ClassVar[str] = "FLUX.1 is a rectified-flow model: use scheduler=sd3"
    pipeline_scheduler_keys: ClassVar[tuple[str, ...]] = ("num_train_timesteps", "shift")
    scheduler_keys_used: ClassVar[str] = "only scheduler.precondition_outputs applies"
    example: ClassVar[str] = "black-forest-labs/FLUX.1-dev"

    name: str = "flux"
    pretrained: str = opt(MISSING, "hub id or local folder of a FluxPipeline (FLUX.1 dev or schnell)")
    resolution: int = opt(1024, "native resolution: the default of data.resolution for this model", ge=8)
    max_sequence_length: int = opt(512, "T5 tokens per prompt (training, caches and validation)", ge=1, le=512)
    guidance_scale: float = opt(3.5, "guidance embedding value while training a guidance-distilled transformer "
                                     "(FLUX.1-dev); unused without guidance_embeds (schnell)", ge=0)


@dataclass(frozen=True)
class NoLoraConfig:
    name: str = "none"


@dataclass(frozen=True)
class LoraOnConfig:
    name: str = "on"
    rank: int = opt(4, "LoRA rank r", ge=1)
    alpha: float | None = opt(None, "LoRA alpha (scale alpha / r); null = rank", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", ge=0, lt=1)
    init: str = opt("gaussian", "initialisation of the A matrices (B starts at zero)", choices=("gaussian", "kaiming"))
    target_modules: list[str] | None = opt(  # noqa: RUF009 (opt() is a dataclasses.field, as in schema.py)
        None, "module names (suffixes) of the denoiser that get adapters; null = the family default "
        "(attention projections)")
    train_text_encoder: bool = opt(False, "also train LoRA adapters on the CLIP text encoder(s)")
    text_encoder_target_modules: list[str] = opt(  # noqa: RUF009
        doc="module names of the CLIP text encoders that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass(frozen=True)
class HFDataConfig(CaptionedImageDataConfig):
    name: str = "hf"
    resolution: int = opt(512, "image size after resize and crop (the YAML sets model.resolution where the model has one)", ge=1)
    dataset: str = opt(MISSING, "hub id of a dataset, a folder written by save_to_disk, or a local folder "
                                "load_dataset reads (needs `pip install difftrain[hf]`)")
    config_name: str | None = opt(None, "dataset configuration name")
    split: str = opt("train", "split to train on")
    image_column: str = opt("image", "column holding the images")
    caption_column: str | None = opt("text", "column holding the captions; null = data.instance_prompt for all")
    max_samples: int | None = opt(None, "use only the first N rows; null = all", ge=1)
