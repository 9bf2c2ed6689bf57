"""The config rules of the pretrained text-to-image families (sd15, sd3), their data and LoRA.

Part of the one rule list, config/rules.py RULES (same conventions: one function per rule, its first
docstring line is its line in docs/configuration.md). Pure Python, no torch.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.config.rule_helpers import changed_keys, chosen_is, node_of, schema_of
from difftrain.config.schema import MISSING_PATH, CaptionedImageDataConfig, ImageFolderDataConfig
from difftrain.config.schema_t2i import (
    MISSING,
    HFDataConfig,
    LoraOnConfig,
    PretrainedPipelineConfig,
    looks_like_path,
)


# ---- model: pretrained pipelines (sd15, sd3) -------------------------------------------------------
def pretrained_pipeline_is_given(cfg: dict) -> list[str]:
    """`model=sd15|sdxl|sd3` need `model.pretrained`: a hub id, or a pipeline folder with model_index.json."""
    if not chosen_is(cfg, "model", PretrainedPipelineConfig):
        return []
    name, pretrained = cfg["model"]["name"], cfg["model"]["pretrained"]
    if pretrained in (MISSING, None, ""):
        example = schema_of(cfg, "model").example or "org/name"
        return [f"model.pretrained is required for model={name}: add model.pretrained=<hub id or local pipeline "
                f"folder>, e.g. model.pretrained={example}"]
    local = Path(pretrained).expanduser()
    if local.exists() or looks_like_path(pretrained):
        if not local.is_dir():
            return [f"model.pretrained '{pretrained}' is not a folder: give a folder written by save_pretrained "
                    "(with model_index.json) or a hub id such as org/name"]
        if not (local / "model_index.json").is_file():
            return [f"model.pretrained '{pretrained}' has no model_index.json: it is not a diffusers pipeline "
                    "folder (write one with pipeline.save_pretrained(folder))"]
    return []


def pretrained_family_scheduler(cfg: dict) -> list[str]:
    """`model=sd15|sdxl` train with `scheduler=ddpm|ddpm_v`, `model=sd3` with `scheduler=sd3`."""
    family = schema_of(cfg, "model")
    scheduler = node_of(cfg, "scheduler").get("name")
    if chosen_is(cfg, "model", PretrainedPipelineConfig) and scheduler is not None and scheduler not in family.schedulers:
        return [f"model={cfg['model']['name']} cannot train with scheduler={scheduler}: {family.scheduler_hint}"]
    return []


def pretrained_family_ignores_scheduler_tables(cfg: dict) -> list[str]:
    """Scheduler keys the pipeline supplies stay at their defaults (sd15, sdxl: `num_train_timesteps`, `beta_*`, `clip_sample`; sd3: `num_train_timesteps`, `shift`)."""
    family = schema_of(cfg, "model")
    if not chosen_is(cfg, "model", PretrainedPipelineConfig) or node_of(cfg, "scheduler").get("name") not in family.schedulers:
        return []
    name, keys = cfg["model"]["name"], family.pipeline_scheduler_keys
    return [f"scheduler.{key}={value!r} has no effect with model={name}: the pipeline's own scheduler config supplies "
            f"{', '.join(keys)} ({family.scheduler_keys_used}); remove scheduler.{key}"
            for key, value in changed_keys(cfg, "scheduler", keys)]


def pretrained_family_trains_on_captioned_rgb(cfg: dict) -> list[str]:
    """`model=sd15|sdxl|sd3` train on captioned RGB images: `data=imagefolder|hf` with `data.channels=3`."""
    data = node_of(cfg, "data")
    if not chosen_is(cfg, "model", PretrainedPipelineConfig) or not data:
        return []
    name = cfg["model"]["name"]
    if not chosen_is(cfg, "data", CaptionedImageDataConfig):
        return [f"model={name} trains on captioned images: use data=imagefolder (captions from metadata.jsonl, "
                f".txt files or data.instance_prompt) or data=hf, not data={data.get('name')}"]
    if data.get("channels", 3) != 3:
        return [f"model={name} needs RGB images: data.channels must be 3"]
    return []


def latent_resolution_multiple_of_8(cfg: dict) -> list[str]:
    """With `model=sd15|sdxl|sd3`, `data.resolution` is a multiple of 8 (the VAE works on 8x8 patches)."""
    resolution = node_of(cfg, "data").get("resolution")
    if chosen_is(cfg, "model", PretrainedPipelineConfig) and isinstance(resolution, int) and resolution % 8:
        return [f"data.resolution ({resolution}) must be a multiple of 8 for model={cfg['model']['name']} "
                "(the VAE works on 8x8 patches)"]
    return []


def replacement_vae_is_a_folder_or_hub_id(cfg: dict) -> list[str]:
    """`model.vae` (sdxl) is null, a hub id, or a folder with config.json (a VAE) or vae/config.json (a pipeline)."""
    vae = node_of(cfg, "model").get("vae")
    if not chosen_is(cfg, "model", PretrainedPipelineConfig) or vae is None:
        return []
    hint = ("give an AutoencoderKL folder (vae.save_pretrained), a pipeline folder, a hub id such as "
            "madebyollin/sdxl-vae-fp16-fix, or model.vae=null for the pipeline's own VAE")
    local = Path(str(vae)).expanduser()
    if vae == "" or ((local.exists() or looks_like_path(vae)) and not local.is_dir()):
        return [f"model.vae '{vae}' is not a folder: {hint}"]
    if local.is_dir() and not ((local / "config.json").is_file() or (local / "vae" / "config.json").is_file()):
        return [f"model.vae '{vae}' has no config.json (nor vae/config.json): {hint}"]
    return []


# ---- data ---------------------------------------------------------------------------------------
def imagefolder_path_is_a_folder(cfg: dict) -> list[str]:
    """`data=imagefolder` needs `data.path`, an existing folder."""
    if not chosen_is(cfg, "data", ImageFolderDataConfig):
        return []
    path = cfg["data"]["path"]
    if path in (MISSING_PATH, ""):
        return ["data.path is required for data=imagefolder: add data.path=/path/to/images"]
    if not Path(path).expanduser().is_dir():
        return [f"data.path '{path}' is not a folder: point data.path at a folder of images "
                "(optionally one subfolder per class)"]
    return []


def hf_dataset_is_given(cfg: dict) -> list[str]:
    """`data=hf` needs `data.dataset`."""
    if chosen_is(cfg, "data", HFDataConfig) and cfg["data"]["dataset"] in (MISSING, ""):
        return ["data.dataset is required for data=hf: add data.dataset=<hub id or local folder>"]
    return []


def hf_captions_or_instance_prompt(cfg: dict) -> list[str]:
    """`data=hf` with `data.caption_column=null` needs `data.instance_prompt`."""
    data = node_of(cfg, "data")
    if chosen_is(cfg, "data", HFDataConfig) and data["caption_column"] is None and data["instance_prompt"] is None:
        return ["data.caption_column=null needs data.instance_prompt (one prompt for every image)"]
    return []


def instance_prompt_not_empty(cfg: dict) -> list[str]:
    """`data.instance_prompt` is a prompt or null (captions from the data), never empty."""
    if chosen_is(cfg, "data", CaptionedImageDataConfig) and cfg["data"]["instance_prompt"] == "":
        return ["data.instance_prompt must not be empty: give a prompt or null (captions from files)"]
    return []


def caption_keys_need_text_to_image(cfg: dict) -> list[str]:
    """`data.cache_latents`, `cache_text_embeddings`, `caption_dropout` and `instance_prompt` need `model=sd15|sdxl|sd3`."""
    model = node_of(cfg, "model").get("name")
    if model is None or not chosen_is(cfg, "data", CaptionedImageDataConfig) or chosen_is(cfg, "model", PretrainedPipelineConfig):
        return []
    keys = ("cache_latents", "cache_text_embeddings", "caption_dropout", "instance_prompt")
    return [f"data.{key} applies to text-to-image models (model=sd15 or model=sd3), not model={model}; remove it"
            for key, _ in changed_keys(cfg, "data", keys)]


def text_encoder_training_cannot_cache(cfg: dict) -> list[str]:
    """`lora.train_text_encoder=true` cannot be combined with `data.cache_text_embeddings=true`."""
    if node_of(cfg, "lora").get("train_text_encoder") and node_of(cfg, "data").get("cache_text_embeddings") is True:
        return ["lora.train_text_encoder=true trains the text encoders, so their embeddings change every step and "
                "cannot be cached: set data.cache_text_embeddings=false (or null)"]
    return []


# ---- lora -----------------------------------------------------------------------------------------
def lora_needs_text_to_image(cfg: dict) -> list[str]:
    """`lora=on` needs a pretrained text-to-image model (`model=sd15|sdxl|sd3`)."""
    model = node_of(cfg, "model").get("name")
    if chosen_is(cfg, "lora", LoraOnConfig) and model is not None and not chosen_is(cfg, "model", PretrainedPipelineConfig):
        return [f"lora=on needs a pretrained text-to-image model (model=sd15 or model=sd3), not model={model}; "
                "use lora=none"]
    return []


def lora_targets_not_empty(cfg: dict) -> list[str]:
    """`lora.target_modules` is null or names modules; with `train_text_encoder`, so does `text_encoder_target_modules`."""
    if not chosen_is(cfg, "lora", LoraOnConfig):
        return []
    lora, errors = cfg["lora"], []
    if lora["target_modules"] is not None and not lora["target_modules"]:
        errors.append("lora.target_modules must name at least one module, or be null for the family default")
    if lora["train_text_encoder"] and not lora["text_encoder_target_modules"]:
        errors.append("lora.text_encoder_target_modules must name at least one module")
    return errors


def lora_formats_are_known(cfg: dict) -> list[str]:
    """`export.lora_formats` lists `diffusers` (always written) and optionally `kohya`, each once."""
    formats = node_of(cfg, "export").get("lora_formats", ["diffusers"])
    errors = [f"export.lora_formats: '{f}' is not a LoRA format; choose from diffusers, kohya"
              for f in dict.fromkeys(formats) if f not in ("diffusers", "kohya")]
    if "diffusers" not in formats:
        errors.append(f"export.lora_formats={formats} leaves out diffusers, which is always written (the kohya "
                      "file is converted from it): use export.lora_formats=[diffusers,kohya]")
    if len(set(formats)) != len(formats):
        errors.append(f"export.lora_formats={formats} names a format twice; list each once")
    return errors


def kohya_lora_format_needs_a_kohya_layout(cfg: dict) -> list[str]:
    """`export.lora_formats` with `kohya` needs `lora=on` and `model=sd15|sdxl|flux` (diffusers loads no SD3 kohya file)."""
    if "kohya" not in node_of(cfg, "export").get("lora_formats", []):
        return []
    model = node_of(cfg, "model").get("name")
    if model is not None and model not in ("sd15", "sdxl", "flux"):
        return [f"export.lora_formats has kohya, but model={model} has no kohya LoRA layout that diffusers loads "
                "(kohya files exist for sd15, sdxl and flux); use export.lora_formats=[diffusers]"
                + (": ComfyUI reads SD3's diffusers file itself" if model == "sd3" else "")]
    if model is not None and not chosen_is(cfg, "lora", LoraOnConfig):
        return ["export.lora_formats has kohya, but lora=none: a full fine-tune has no LoRA to convert; add "
                "lora=on, or use export.lora_formats=[diffusers]"]
    return []


def quantized_base_needs_lora(cfg: dict) -> list[str]:
    """`model.quantize_base` (nf4, int8, fp8) quantises the frozen base under LoRA: it needs `lora=on`."""
    if not chosen_is(cfg, "model", PretrainedPipelineConfig):
        return []
    kind = node_of(cfg, "model").get("quantize_base", "none")
    if kind != "none" and not chosen_is(cfg, "lora", LoraOnConfig):
        return [f"model.quantize_base={kind} quantises the frozen denoiser under LoRA adapters (QLoRA), but "
                "lora=none trains every weight; add lora=on, or set model.quantize_base=none"]
    return []
