"""Data sources: digits (scikit-learn), a folder of images, a Hugging Face `datasets` dataset.

Each builds an in-memory `ImageDataset` of images in [-1, 1], labels and captions; the batch of a
step is drawn from it by index (data/order.py decides which indices)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.components.seeding import seed_for
from difftrain.data.transforms import load_image, resize_tensor
from difftrain.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class ImageDataset:
    """Images in [-1, 1] (N, C, H, W) kept in memory, with integer labels (or None)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    random_flip: bool = False
    captions: list[str | None] | None = None  # per image (text-to-image models); None = no captions
    caption_dropout: float = 0.0

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """{"pixels", "labels", "indices", "flips"} of the given dataset indices, plus "captions" and
        "dropped" when the data has captions. Flips, then caption dropout (only with a generator: training),
        are drawn from `generator`; a dropped caption becomes the empty prompt."""
        x = self.images[indices]
        flip = None
        if self.random_flip and generator is not None:  # augmentation is for training only
            flip = torch.rand(len(indices), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        labels = self.labels[indices] if self.labels is not None else None
        out = {"pixels": x, "labels": labels, "indices": indices, "flips": flip}
        if self.captions is not None:
            dropped = torch.zeros(len(indices), dtype=torch.bool)
            if self.caption_dropout > 0 and generator is not None:
                dropped = torch.rand(len(indices), generator=generator) < self.caption_dropout
            out["captions"] = ["" if d else self.captions[i] for i, d in zip(indices.tolist(), dropped.tolist())]
            out["dropped"] = dropped
        return out


def build_digits(options, interpolation, seed: int) -> ImageDataset:
    """scikit-learn's bundled UCI digits: 1,797 8x8 images with values 0..16 (no download).
    `options`: config/schema.py DigitsDataConfig."""
    from sklearn.datasets import load_digits

    resolution, random_flip, num_classes = options.resolution, options.random_flip, options.num_classes

    digits = load_digits(n_class=num_classes)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0, 1]
    if resolution != images.shape[-1]:
        images = resize_tensor(images, resolution, interpolation)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return ImageDataset(images * 2.0 - 1.0, labels, num_classes, random_flip)


def _list_images(root: Path) -> list[tuple[Path, str | None]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, str | None]] = []
    if classes:
        for cls in classes:
            for dirpath, _, names in os.walk(root / cls):
                files += [(Path(dirpath) / n, cls) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    files += [(p, None) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return files


def build_imagefolder(options, interpolation, seed: int) -> ImageDataset:
    """Load, resize (shorter side, chosen interpolation) and crop every image once; read the captions.

    `options`: config/schema.py ImageFolderDataConfig. Its cache keys (cache_latents, cache_text_embeddings,
    cache_dir) are read by engine/setup.py for the text-to-image families, which build the caches."""
    from PIL import Image

    from difftrain.data.captions import read_captions

    path, resolution, center_crop, channels = options.path, options.resolution, options.center_crop, options.channels
    num_classes, random_flip = options.num_classes, options.random_flip
    caption_column, instance_prompt = options.caption_column, options.instance_prompt

    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path '{path}' is not a folder: point data.path at a folder of images "
                        "(optionally one subfolder per class)")
    files = _list_images(root)
    if not files:
        raise UserError(f"data.path '{path}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "add images or fix data.path")
    class_names = sorted({c for _, c in files if c is not None})
    if class_names and any(c is None for _, c in files):
        raise UserError(f"data.path '{path}' mixes class subfolders with loose images; "
                        "move the loose images into a class subfolder")
    crop_gen = torch.Generator().manual_seed(seed_for(seed, 0, "crop"))
    tensors = []
    for file, _ in files:
        try:
            with Image.open(file) as im:
                tensors.append(load_image(im, resolution, center_crop, channels, interpolation, crop_gen))
        except OSError as exc:
            raise UserError(f"could not read image '{file}' ({exc}); remove or replace the file") from None
    labels = None
    if class_names:
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[c] for _, c in files], dtype=torch.long)
        num_classes = num_classes or len(class_names)
        if len(class_names) > num_classes:
            raise UserError(f"data.path has {len(class_names)} class folders but data.num_classes={num_classes}; "
                            "raise data.num_classes or remove folders")
    captions = read_captions(root, [f for f, _ in files], caption_column, instance_prompt)
    return ImageDataset(torch.stack(tensors), labels, num_classes if labels is not None else None, random_flip,
                        captions, options.caption_dropout)


def build_hf(options, interpolation, seed: int) -> ImageDataset:
    """A `datasets` dataset: a folder written by save_to_disk, a local folder load_dataset reads, or a hub id.
    `options`: config/schema_t2i.py HFDataConfig."""
    dataset, split, image_column, caption_column = options.dataset, options.split, options.image_column, \
        options.caption_column
    resolution, center_crop, channels = options.resolution, options.center_crop, options.channels
    instance_prompt, max_samples, config_name = options.instance_prompt, options.max_samples, options.config_name
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
    return ImageDataset(torch.stack(images), None, None, options.random_flip, captions, options.caption_dropout)


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
