"""Captions for image data: metadata.jsonl, .txt files, a fixed instance prompt; and the `data=hf` source.

Caption sources of `data=imagefolder`, in order:
1. `data.instance_prompt` set: that prompt for every image (DreamBooth style); files are not read.
2. a `metadata.jsonl` in the image's folder (or any folder above it, up to data.path) with a row
   {"file_name": <path relative to that metadata.jsonl>, "text": <caption>} (`data.caption_column` names
   the caption field), as Hugging Face's imagefolder reads it;
3. a `.txt` file beside the image with the same stem (`dog1.png` -> `dog1.txt`).
Images without a caption are listed in one error when a text-to-image model trains on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difftrain.errors import UserError


def _metadata(folder: Path, caption_column: str) -> dict[Path, str]:
    path = folder / "metadata.jsonl"
    out: dict[Path, str] = {}
    if not path.is_file():
        return out
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc}); each line must be an object such "
                            'as {"file_name": "a.png", "text": "a photo of a dog"}') from None
        if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
            raise UserError(f"{path} line {number} needs the keys 'file_name' and '{caption_column}' "
                            "(data.caption_column names the caption key)")
        text = row[caption_column]
        if not isinstance(text, str):
            raise UserError(f"{path} line {number}: the caption '{caption_column}' must be a string, got "
                            f"{type(text).__name__}")
        out[(folder / row["file_name"]).resolve()] = text
    return out


def read_captions(root: Path, files: list[Path], caption_column: str = "text",
                  instance_prompt: str | None = None) -> list[str | None] | None:
    """One caption per file (None where a file has none); None when no file has a caption at all."""
    if instance_prompt is not None:
        return [instance_prompt] * len(files)
    root = root.resolve()
    table: dict[Path, str] = {}
    folders = {root}
    for file in files:
        folder = file.resolve().parent
        while folder != root and root in folder.parents:
            folders.add(folder)
            folder = folder.parent
    for folder in sorted(folders, key=lambda p: len(p.parts)):  # deeper metadata.jsonl files win
        table.update(_metadata(folder, caption_column))
    captions: list[str | None] = []
    for file in files:
        text = table.get(file.resolve())
        if text is None and file.with_suffix(".txt").is_file():
            text = file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        captions.append(text)
    return captions if any(c is not None for c in captions) else None


def require_captions(data, names: list[str] | None = None) -> list[str]:
    """The captions of a dataset, or one UserError naming the images that have none."""
    captions = getattr(data, "captions", None)
    if captions is None:
        raise UserError("the training images have no captions: add a metadata.jsonl (one line per image: "
                        '{"file_name": "a.png", "text": "a photo of ..."}), a .txt file beside each image, '
                        "or set data.instance_prompt='a photo of sks dog'")
    missing = [i for i, c in enumerate(captions) if c is None]
    if missing:
        shown = ", ".join(names[i] if names else str(i) for i in missing[:5])
        raise UserError(f"{len(missing)} of {len(captions)} images have no caption (e.g. {shown}); add them to "
                        "metadata.jsonl or as .txt files, or set data.instance_prompt")
    return captions


def build_hf(name: str, dataset: str, config_name: str | None = None, split: str = "train",
             image_column: str = "image", caption_column: str | None = "text", max_samples: int | None = None,
             resolution: int = 512, center_crop: bool = True, random_flip: bool = False, channels: int = 3,
             instance_prompt: str | None = None, caption_dropout: float = 0.0, interpolation=None, seed: int = 0,
             **cache_options):
    """A `datasets` dataset: a folder written by save_to_disk, a local folder load_dataset reads, or a hub id."""
    from difftrain.components.seeding import seed_for
    from difftrain.engine.data import ImageDataset, load_image

    rows = _load_hf(dataset, config_name, split)
    for column in (image_column, caption_column if instance_prompt is None else None):
        if column is not None and column not in rows.column_names:
            raise UserError(f"data.dataset '{dataset}' has no column '{column}'; its columns are "
                            f"{', '.join(rows.column_names)} (set data.image_column / data.caption_column)")
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    if len(rows) == 0:
        raise UserError(f"data.dataset '{dataset}' split '{split}' has no rows")
    crop_gen = torch.Generator().manual_seed(seed_for(seed, 0, "crop"))
    images, captions = [], []
    for i, row in enumerate(rows):
        image = row[image_column]
        if not hasattr(image, "convert"):
            raise UserError(f"data.image_column '{image_column}' of '{dataset}' holds {type(image).__name__}, not "
                            "images; name the column with the images")
        images.append(load_image(image, resolution, center_crop, channels, interpolation, crop_gen))
        text = instance_prompt if instance_prompt is not None else row[caption_column]
        if not isinstance(text, str):
            raise UserError(f"row {i} of '{dataset}': the caption column '{caption_column}' must hold strings, "
                            f"got {type(text).__name__}")
        captions.append(text)
    return ImageDataset(torch.stack(images), None, None, random_flip, captions, caption_dropout)


def _load_hf(dataset: str, config_name: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise UserError("data=hf needs the `datasets` package: pip install 'difftrain[hf]' (or pip install "
                        "datasets), or use data=imagefolder with a metadata.jsonl") from None
    local = Path(dataset).expanduser()
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))  # written by save_to_disk
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"data.dataset '{dataset}' has the splits {', '.join(loaded)}, not "
                                    f"data.split='{split}'")
                loaded = loaded[split]
            return loaded
        if local.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(local), split=split)
        return datasets.load_dataset(dataset, config_name, split=split)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (datasets raises FileNotFoundError, DatasetNotFoundError, ...)
        raise UserError(f"could not load data.dataset='{dataset}' split '{split}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); give a folder written by save_to_disk, "
                        "a local image folder, or a reachable hub dataset id") from None
