"""Datasets and the replayable batch order.

The order of the data is a pure function of (seed, epoch): a permutation drawn from a generator
seeded with both. The batch of optimizer step `s` is therefore computed from `s` alone, so resume
needs no sampler state and can never replay or skip samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.components.seeding import seed_for
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
        if self.random_flip:
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


def _resize_tensor(images: torch.Tensor, resolution: int, interpolation) -> torch.Tensor:
    """Resize (N, C, H, W) float images in [0, 1] through PIL so every interpolation mode works."""
    from torchvision.transforms import functional as TF

    out = []
    for img in images:
        pil = TF.to_pil_image(img)
        pil = TF.resize(pil, [resolution, resolution], interpolation=interpolation)
        out.append(TF.pil_to_tensor(pil).float() / 255.0)
    return torch.stack(out)


def build_digits(name: str, resolution: int = 8, random_flip: bool = False, num_classes: int = 10,
                 channels: int = 1, interpolation=None, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled UCI digits: 1,797 8x8 images with values 0..16 (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=num_classes)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0, 1]
    if resolution != images.shape[-1]:
        images = _resize_tensor(images, resolution, interpolation)
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


def load_image(im, resolution: int, center_crop: bool, channels: int, interpolation,
               crop_gen: torch.Generator) -> torch.Tensor:
    """A PIL image -> (C, resolution, resolution) in [-1, 1]: EXIF transpose, resize the shorter side, crop."""
    from PIL import ImageOps
    from torchvision.transforms import functional as TF

    im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
    im = TF.resize(im, resolution, interpolation=interpolation)
    if center_crop:
        im = TF.center_crop(im, [resolution, resolution])
    else:
        top = int(torch.randint(0, im.height - resolution + 1, (1,), generator=crop_gen))
        left = int(torch.randint(0, im.width - resolution + 1, (1,), generator=crop_gen))
        im = TF.crop(im, top, left, resolution, resolution)
    return TF.pil_to_tensor(im).float() / 127.5 - 1.0


def build_imagefolder(name: str, path: str, resolution: int = 64, center_crop: bool = True,
                      random_flip: bool = False, channels: int = 3, num_classes: int | None = None,
                      interpolation=None, seed: int = 0, caption_column: str = "text",
                      instance_prompt: str | None = None, caption_dropout: float = 0.0,
                      **cache_options) -> ImageDataset:
    """Load, resize (shorter side, chosen interpolation) and crop every image once; read the captions.

    `cache_options` (cache_latents, cache_text_embeddings, cache_dir) are read by the text-to-image
    families, which build the caches (difftrain/engine/families/cache.py)."""
    from PIL import Image

    from difftrain.engine.families.t2i_data import read_captions

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
                        captions, caption_dropout)


class BatchOrder:
    """Global sample indices of (step, micro-batch, rank): epoch permutations of (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.world_size, self.seed = n, batch_size, world_size, seed
        self.micro_per_step = grad_accum
        self.global_micro = batch_size * world_size
        self.micro_per_epoch = n // self.global_micro
        if self.micro_per_epoch < grad_accum:
            raise UserError(
                f"the dataset has {n} samples, fewer than one optimizer step needs "
                f"({batch_size} x {grad_accum} accumulation x {world_size} processes); "
                "lower trainer.batch_size or trainer.grad_accum, or add data")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, "data") + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> tuple[int, torch.Tensor]:
        """(epoch, indices) of one micro-batch; the last incomplete micro-batch of an epoch is dropped."""
        k = step * self.micro_per_step + micro
        epoch, pos = divmod(k, self.micro_per_epoch)
        start = pos * self.global_micro + rank * self.batch_size
        return epoch, self._permutation(epoch)[start : start + self.batch_size]
