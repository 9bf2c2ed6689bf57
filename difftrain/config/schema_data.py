"""Schemas of the captioned-image data options (data=imagefolder, data=hf's base, data=sources) and their
recipe keys: caption processing, repeats, loss masks, DreamBooth prior preservation (docs/recipes.md).

Pure Python like schema.py (which re-exports these classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difftrain.config.fields import opt

MISSING_PATH = "???"

# keys of the data node that hold for the whole run (not per entry of data.sources)
RUN_WIDE_DATA_KEYS = ("name", "center_crop", "random_flip", "channels", "bucket_step", "max_upscale",
                      "validation_split", "on_bad_image", "cache_latents", "cache_text_embeddings", "cache_fill",
                      "cache_dir", "sources")
SOURCE_KINDS = ("imagefolder", "hf")


def source_nodes(data: dict) -> list[tuple[str, dict]]:
    """(key prefix, effective node with its `kind`) of every source of a data node: the node itself, or each
    mapping entry of data.sources laid over it (the top-level keys are every entry's defaults)."""
    if "sources" not in data:  # a single source (data=imagefolder|hf|dreambooth|digits)
        return [("data", {**data, "kind": "hf" if data.get("name") == "hf" else "imagefolder"})]
    return [(f"data.sources[{i}]", {**data, "kind": "imagefolder", **e})
            for i, e in enumerate(data["sources"] or []) if isinstance(e, dict)]


def one_image_size(data: dict) -> bool:
    """Every source trains at one size: no buckets and one resolution."""
    nodes = [n for _, n in source_nodes(data)]
    return all(n.get("buckets", "none") == "none" for n in nodes) and len({n.get("resolution") for n in nodes}) <= 1


def latents_cached(data: dict) -> bool:
    """`data.cache_latents` resolved: true/false as given; null (auto) = cached when the crop is the center
    one (the cache then holds exactly the latents the run would encode, both flips included), unless prior
    preservation needs several image sizes (class images are cached at one)."""
    if "cache_latents" not in data:  # data=digits: nothing to cache
        return False
    if data["cache_latents"] is not None:
        return bool(data["cache_latents"])
    if not data.get("center_crop", True):
        return False
    prior = any(n.get("with_prior_preservation") for _, n in source_nodes(data))
    return not prior or one_image_size(data)


@dataclass(frozen=True)
class CaptionedImageDataConfig:
    """Keys shared by the image-and-caption sources (data=imagefolder, data=hf); the text-to-image rules
    (difftrain/config/rules.py) apply to every option whose schema derives from this one."""

    name: str = ""
    resolution: int = opt(512, "image size after resize and crop", ge=1)
    center_crop: bool = opt(True, "center crop (else a random crop, drawn per sample and epoch; with "
                                  "cache_latents one crop per sample, drawn once)")
    random_flip: bool = opt(False, "random horizontal flip, drawn per sample and epoch")
    channels: int = opt(3, "RGB", choices=(3,))
    buckets: str | list[list[int]] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        "none", "aspect-ratio buckets: none (one square of data.resolution), auto (a ladder of about "
        "data.resolution^2 pixels, aspect 1:4..4:1) or a list of [height, width]")
    bucket_step: int | None = opt(None, "side granularity of buckets=auto; null = about data.resolution / 16, a "
                                   "multiple of the model's size multiple", ge=1)
    max_upscale: float = opt(2.0, "an image upscaled more than this to cover its bucket is too small "
                                  "(see on_bad_image)", ge=1)
    validation_split: float = opt(0.0, "samples held out for the validation loss: a fraction (< 1) or a count; "
                                       "0 = the validation loss reads the first training samples", ge=0)
    on_bad_image: str = opt("error", "unreadable, truncated, empty or too-small images: error (list them all, "
                                     "exit 2) or skip (train without them, listed in RUN_DIR/data/skipped.txt)",
                            choices=("error", "skip"))
    instance_prompt: str | None = opt(None, "one prompt for every image (overrides the captions)")
    caption_dropout: float = opt(0.0, "probability of training a sample on the empty prompt", ge=0, le=1)
    caption_prefix: str = opt("", "trigger words joined as the first tag of every caption ('sks dog' -> "
                                  "'sks dog, <caption>')")
    caption_suffix: str = opt("", "words joined as the last tag of every caption")
    shuffle_tags: bool = opt(False, "shuffle the comma-separated tags of each caption per sample and epoch")
    keep_tags: int = opt(0, "leading tags that shuffle_tags and tag_dropout leave in place", ge=0)
    tag_dropout: float = opt(0.0, "probability of dropping each (non-kept) tag, per sample and epoch", ge=0, lt=1)
    repeats: float = opt(1.0, "times each image is seen per epoch: 2 = twice, 0.5 = half of them (a new half "
                              "each epoch); weighs sources against each other in data=sources", gt=0)
    masks: str = opt("none", "loss masks: none, files (<stem>_mask.png beside each image) or alpha (the "
                             "image's alpha channel)", choices=("none", "files", "alpha"))
    unmasked_weight: float = opt(0.0, "loss weight of the pixels outside the mask (1 = no masking)", ge=0, le=1)
    with_prior_preservation: bool = opt(False, "DreamBooth prior preservation: pair each batch with class "
                                               "images of class_prompt (generated when missing)")
    class_data_dir: str | None = opt(None, "folder of the class images (missing ones are generated into it)")
    class_prompt: str | None = opt(None, "prompt of the class images ('a photo of a dog')")
    num_class_images: int = opt(100, "class images to train with (generated with the base pipeline when the "
                                     "folder has fewer)", ge=1)
    prior_loss_weight: float = opt(1.0, "weight of the class images' loss (loss = instance + w x prior)", ge=0)
    class_image_steps: int = opt(30, "inference steps of the class-image generation", ge=1)
    cache_latents: bool | None = opt(None, "encode every image with the VAE once into an on-disk cache (each "
                                            "flip with random_flip); null = when the crop is the center one")
    cache_text_embeddings: bool | None = opt(None, "cache prompt embeddings; null = when the text encoders "
                                                   "are frozen")
    cache_fill: str = opt("auto", "when cached entries are computed: lazy (by the step that first needs one, "
                                  "written as it goes: no pass before step 1), ahead (all before step 1, "
                                  "then the frozen encoders are released), auto (latents lazily; prompt "
                                  "embeddings lazily unless the frozen text encoders hold over 1 GiB: SDXL, SD3, FLUX)",
                          choices=("auto", "lazy", "ahead"))
    cache_dir: str | None = opt(None, "folder of the caches; null = RUN_DIR/cache")


@dataclass(frozen=True)
class ImageFolderDataConfig(CaptionedImageDataConfig):
    name: str = "imagefolder"
    resolution: int = opt(64, "image size after resize and crop (the YAML sets model.resolution where the model has one)", ge=1)
    channels: int = opt(3, "1 = grayscale, 3 = RGB", choices=(1, 3))
    path: str = opt(MISSING_PATH, "folder of images; class subfolders give labels")
    num_classes: int | None = opt(None, "number of labels; null = count the class subfolders", ge=1)
    caption_column: str = opt("text", "caption field of metadata.jsonl rows (text-to-image models; captions "
                                      "also come from a .txt file beside each image)")


@dataclass(frozen=True)
class SourcesDataConfig(CaptionedImageDataConfig):
    """Several image sources in one run. Every key but `sources` is the default of each entry (and the
    run-wide keys, RUN_WIDE_DATA_KEYS, hold for all); an entry is a mapping with `kind: imagefolder|hf`
    (default imagefolder), an optional `name` (the metrics' label) and any per-source key of that kind."""

    name: str = "sources"
    resolution: int = opt(512, "image size after resize and crop (the YAML sets model.resolution where the model has one)", ge=1)
    caption_column: str = opt("text", "caption field of metadata.jsonl rows / the dataset's caption column")
    sources: list[Any] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        doc="the sources: [{path: ./photos, repeats: 2}, {kind: hf, dataset: ./style, caption_prefix: sks}]",
        factory=list)
