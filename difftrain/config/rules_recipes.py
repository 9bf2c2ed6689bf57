"""Rules of the dataset recipes (docs/recipes.md): data=sources entries, DreamBooth prior preservation, masks,
caption processing. Part of the one rule list, config/rules.py RULES (one function per rule, its docstring
the line in docs/configuration.md). Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difftrain.config.rule_helpers import chosen_is, node_of
from difftrain.config.schema_data import (
    MISSING_PATH,
    RUN_WIDE_DATA_KEYS,
    SOURCE_KINDS,
    CaptionedImageDataConfig,
    ImageFolderDataConfig,
    SourcesDataConfig,
    one_image_size,
    source_nodes,
)
from difftrain.config.schema_t2i import HFDataConfig, PretrainedPipelineConfig


def _entries(cfg: dict) -> list[tuple[str, dict]]:
    """(key prefix, effective node) of every source: the data node, or each data.sources entry over it."""
    if not chosen_is(cfg, "data", CaptionedImageDataConfig):
        return []
    return source_nodes(node_of(cfg, "data"))


def sources_entries_are_valid(cfg: dict) -> list[str]:
    """`data=sources` needs a non-empty `data.sources` list of mappings, each with a known `kind`, its own keys only, and an existing `path` (imagefolder) or a `dataset` (hf)."""
    if not chosen_is(cfg, "data", SourcesDataConfig):
        return []
    from difftrain.config.validate import _check_dataclass  # (validate imports the rules)

    data, errors = node_of(cfg, "data"), []
    entries = data.get("sources") or []
    if not entries:
        return ["data=sources needs data.sources, a list such as '[{path: ./photos}, {path: ./style, repeats: 2}]'"]
    for i, entry in enumerate(entries):
        prefix = f"data.sources[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{prefix} must be a mapping such as {{path: ./photos, repeats: 2}}, got {entry!r}")
            continue
        kind = entry.get("kind", "imagefolder")
        if kind not in SOURCE_KINDS:
            errors.append(f"{prefix}.kind={kind!r} must be one of {', '.join(SOURCE_KINDS)}")
            continue
        cls = ImageFolderDataConfig if kind == "imagefolder" else HFDataConfig
        own = {f.name for f in dataclasses.fields(cls)} - set(RUN_WIDE_DATA_KEYS) | {"kind", "name"}
        for key in entry:
            if key not in own:
                where = "a run-wide key: set it on data, not on an entry" if key in RUN_WIDE_DATA_KEYS else \
                    f"not a key of {kind} sources"
                errors.append(f"{prefix}.{key} is {where}; entry keys: {', '.join(sorted(own))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        merged = {k: v for k, v in data.items() if k in fields and k != "name"}
        merged.update({k: v for k, v in entry.items() if k in own and k not in ("kind", "name")})
        merged["name"] = kind
        if _check_dataclass(prefix, merged, cls, errors) is None:
            continue
        if kind == "imagefolder":
            path = merged.get("path", MISSING_PATH)
            if path in (MISSING_PATH, "", None) or not Path(str(path)).expanduser().is_dir():
                errors.append(f"{prefix}.path {path!r} is not a folder: give each imagefolder entry the folder of "
                              "its images")
        elif merged.get("dataset") in (MISSING_PATH, "", None):
            errors.append(f"{prefix}.dataset is required for kind: hf (a hub id, a save_to_disk folder or a local "
                          "folder)")
    return errors


def recipes_need_text_to_image(cfg: dict) -> list[str]:
    """`data=sources`, prior preservation and caption processing need a pretrained text-to-image model (`model=sd15|sdxl|sd3|flux`)."""
    model = node_of(cfg, "model").get("name")
    if model is None or chosen_is(cfg, "model", PretrainedPipelineConfig) or not _entries(cfg):
        return []
    if chosen_is(cfg, "data", SourcesDataConfig):
        return [f"data=sources trains text-to-image models (model=sd15|sdxl|sd3|flux), not model={model}"]
    node = _entries(cfg)[0][1]
    used = [k for k in ("with_prior_preservation", "shuffle_tags", "caption_prefix", "caption_suffix")
            if node.get(k) not in (False, "", None)] + (["tag_dropout"] if node.get("tag_dropout") else [])
    return [f"data.{k} applies to text-to-image models (model=sd15|sdxl|sd3|flux), not model={model}; remove it"
            for k in used]


def prior_preservation_is_complete(cfg: dict) -> list[str]:
    """Prior preservation needs `class_prompt` and `class_data_dir` (the folder generated class images go to)."""
    errors = []
    for prefix, node in _entries(cfg):
        if not node.get("with_prior_preservation"):
            continue
        for key, example in (("class_prompt", "'a photo of a dog'"), ("class_data_dir", "./class_images/dog")):
            if not node.get(key):
                errors.append(f"{prefix}.with_prior_preservation=true needs {prefix}.{key} (e.g. {example})")
    return errors


def prior_with_cached_latents_needs_one_size(cfg: dict) -> list[str]:
    """Prior preservation with `data.cache_latents=true` needs one image size: `data.buckets=none` and one `resolution` (class latents are cached at it; null caches only then)."""
    entries = _entries(cfg)
    if node_of(cfg, "data").get("cache_latents") is not True or not any(n.get("with_prior_preservation")
                                                                         for _, n in entries):
        return []
    if not one_image_size(node_of(cfg, "data")):
        return ["data.with_prior_preservation with data.cache_latents=true needs one image size (class images "
                "are cached at it): set data.buckets=none and one resolution, or data.cache_latents=false"]
    return []


def masks_from_files_need_an_image_folder(cfg: dict) -> list[str]:
    """`masks: files` reads `<stem>_mask.png` beside each image: only for imagefolder sources (`alpha` works for both)."""
    return [f"{prefix}.masks=files reads <stem>_mask.png files beside images; a datasets source has none: use "
            f"{prefix}.masks=alpha (the image's alpha channel)" for prefix, node in _entries(cfg)
            if node.get("masks") == "files" and node["kind"] == "hf"]


def random_captions_cannot_cache_text(cfg: dict) -> list[str]:
    """`shuffle_tags` or `tag_dropout` change captions every epoch: not with `data.cache_text_embeddings=true`."""
    if node_of(cfg, "data").get("cache_text_embeddings") is not True:
        return []
    if any(n.get("shuffle_tags") or n.get("tag_dropout") for _, n in _entries(cfg)):
        return ["data.shuffle_tags / tag_dropout change each caption every epoch, so one cached embedding per "
                "caption would be stale: set data.cache_text_embeddings=null (off for these runs) or false"]
    return []
