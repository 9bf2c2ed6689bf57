"""Schemas of the latent text-to-image options: model=sd15|sd3, lora=off|on, data=hf, and their checks.

Pure Python like schema.py. The cross-key checks (`check(cfg)`) reject the combinations that have no
meaning (a DDPM scheduler for SD3, cached text embeddings with a trained text encoder, ...) before
anything is loaded; docs/fine-tuning-sd15.md and docs/fine-tuning-sd3.md explain each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftrain.config.fields import opt

MISSING = "???"
T2I_MODELS = ("sd15", "sd3")
T2I_DATA = ("imagefolder", "hf")
FAMILY_SCHEDULERS = {"sd15": ("ddpm", "ddpm_v"), "sd3": ("sd3",)}
SCHEDULER_HINT = {"sd15": "use scheduler=ddpm (epsilon) or scheduler=ddpm_v (v_prediction)",
                  "sd3": "SD3 is a rectified-flow model: use scheduler=sd3"}


def looks_like_path(value: str) -> bool:
    """A local path (./x, /x, ~/x, C:\\x, a/b/c) rather than a hub id 'org/name'."""
    return value.startswith((".", "/", "~", "\\")) or value.count("/") > 1 or "\\" in value or ":" in value


def _model_checks(model: dict, cfg: dict) -> list[str]:
    name = model["name"]
    errors = []
    pretrained = model.get("pretrained")
    if pretrained in (MISSING, None, ""):
        errors.append(f"model.pretrained is required for model={name}: add model.pretrained=<hub id or local "
                      "pipeline folder>, e.g. model.pretrained=" +
                      ("stable-diffusion-v1-5/stable-diffusion-v1-5" if name == "sd15"
                       else "stabilityai/stable-diffusion-3-medium-diffusers"))
    else:
        local = Path(pretrained).expanduser()
        if local.exists() or looks_like_path(pretrained):
            if not local.is_dir():
                errors.append(f"model.pretrained '{pretrained}' is not a folder: give a folder written by "
                              "save_pretrained (with model_index.json) or a hub id such as org/name")
            elif not (local / "model_index.json").is_file():
                errors.append(f"model.pretrained '{pretrained}' has no model_index.json: it is not a diffusers "
                              "pipeline folder (write one with pipeline.save_pretrained(folder))")
    scheduler = cfg.get("scheduler", {}).get("name")
    if scheduler is not None and scheduler not in FAMILY_SCHEDULERS[name]:
        errors.append(f"model={name} cannot train with scheduler={scheduler}: {SCHEDULER_HINT[name]}")
    data = cfg.get("data", {})
    if data.get("name") not in T2I_DATA:
        errors.append(f"model={name} trains on captioned images: use data=imagefolder (captions from "
                      "metadata.jsonl, .txt files or data.instance_prompt) or data=hf, not "
                      f"data={data.get('name')}")
    elif data.get("channels", 3) != 3:
        errors.append(f"model={name} needs RGB images: data.channels must be 3")
    resolution = data.get("resolution")
    if isinstance(resolution, int) and resolution % 8:
        errors.append(f"data.resolution ({resolution}) must be a multiple of 8 for model={name} "
                      "(the VAE works on 8x8 patches)")
    return errors


def data_t2i_checks(data: dict, cfg: dict) -> list[str]:
    """Caption and cache keys of data=imagefolder|hf: only meaningful for text-to-image models."""
    model = cfg.get("model", {}).get("name")
    errors = []
    if model not in T2I_MODELS:
        for key, default in (("cache_latents", False), ("cache_text_embeddings", None), ("caption_dropout", 0.0),
                             ("instance_prompt", None)):
            if data.get(key, default) != default:
                errors.append(f"data.{key} applies to text-to-image models (model=sd15 or model=sd3), not "
                              f"model={model}; remove it")
    lora = cfg.get("lora", {})
    if lora.get("train_text_encoder") and data.get("cache_text_embeddings") is True:
        errors.append("lora.train_text_encoder=true trains the text encoders, so their embeddings change every "
                      "step and cannot be cached: set data.cache_text_embeddings=false (or null)")
    if data.get("instance_prompt") == "":
        errors.append("data.instance_prompt must not be empty: give a prompt or null (captions from files)")
    return errors


@dataclass
class SD15ModelConfig:
    name: str = "sd15"
    pretrained: str = opt(MISSING, "hub id or local folder of a StableDiffusionPipeline (SD 1.x / 2.x)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit); null = main")
    variant: str | None = opt(None, "weight file variant to load, e.g. fp16 (training weights are fp32)")
    resolution: int = opt(512, "native resolution: the default of data.resolution for this model", ge=8)

    def check(self, cfg: dict) -> list[str]:
        return _model_checks(cfg["model"], cfg)


@dataclass
class SD3ModelConfig:
    name: str = "sd3"
    pretrained: str = opt(MISSING, "hub id or local folder of a StableDiffusion3Pipeline")
    revision: str | None = opt(None, "hub revision (branch, tag or commit); null = main")
    variant: str | None = opt(None, "weight file variant to load, e.g. fp16 (training weights are fp32)")
    resolution: int = opt(1024, "native resolution: the default of data.resolution for this model", ge=8)
    max_sequence_length: int = opt(77, "T5 tokens per prompt (training, caches and validation)", ge=1, le=512)

    def check(self, cfg: dict) -> list[str]:
        return _model_checks(cfg["model"], cfg)


@dataclass
class LoraOffConfig:
    name: str = "off"


@dataclass
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

    def check(self, cfg: dict) -> list[str]:
        model = cfg.get("model", {}).get("name")
        if model not in T2I_MODELS:
            return [(f"lora=on needs a pretrained text-to-image model (model=sd15 or model=sd3), not "
                     f"model={model}; use lora=off")]
        errors = []
        if self.target_modules is not None and not self.target_modules:
            errors.append("lora.target_modules must name at least one module, or be null for the family default")
        if self.train_text_encoder and not self.text_encoder_target_modules:
            errors.append("lora.text_encoder_target_modules must name at least one module")
        return errors


@dataclass
class HFDataConfig:
    name: str = "hf"
    dataset: str = opt(MISSING, "hub id of a dataset, a folder written by save_to_disk, or a local folder "
                                "load_dataset reads (needs `pip install difftrain[hf]`)")
    config_name: str | None = opt(None, "dataset configuration name")
    split: str = opt("train", "split to train on")
    image_column: str = opt("image", "column holding the images")
    caption_column: str | None = opt("text", "column holding the captions; null = data.instance_prompt for all")
    max_samples: int | None = opt(None, "use only the first N rows; null = all", ge=1)
    resolution: int = opt(512, "image size after resize and crop", ge=1)
    center_crop: bool = opt(True, "center crop (else a random crop, fixed per image)")
    random_flip: bool = opt(False, "random horizontal flip, drawn per step")
    channels: int = opt(3, "RGB", choices=(3,))
    instance_prompt: str | None = opt(None, "one prompt for every image (overrides the captions)")
    caption_dropout: float = opt(0.0, "probability of training a sample on the empty prompt", ge=0, le=1)
    cache_latents: bool = opt(False, "encode every image with the VAE once (both flips when random_flip)")
    cache_text_embeddings: bool | None = opt(None, "cache prompt embeddings; null = when the text encoders "
                                                   "are frozen")
    cache_dir: str | None = opt(None, "folder of the caches; null = RUN_DIR/cache")

    def check(self, cfg: dict) -> list[str]:
        errors = []
        if self.dataset in (MISSING, ""):
            errors.append("data.dataset is required for data=hf: add data.dataset=<hub id or local folder>")
        if self.caption_column is None and self.instance_prompt is None:
            errors.append("data.caption_column=null needs data.instance_prompt (one prompt for every image)")
        return errors + data_t2i_checks(cfg.get("data", {}), cfg)
