"""Loss masks (data.masks, docs/recipes.md): one grey-scale weight per pixel of an image, transformed exactly as
its image (same bucket, resize, crop and flip), downsampled to the latent size by the objective.

- `files`: `<stem>_mask.png` beside the image (white = train, black = ignore); an image without one trains
  everywhere (an all-white mask). Mask files are not training images. A mask whose size differs from its
  image's is a bad-data entry (listed with the other bad images: data.on_bad_image decides).
- `alpha`: the image's own alpha channel (opaque = train); an image without alpha trains everywhere.
Pixels outside the mask are weighted by `data.unmasked_weight` (0 = ignored, 1 = no mask at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from difftrain.data.caption_rules import CaptionRules

MASK_SUFFIX = "_mask"


def mask_path(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def mask_problems(keys: list[str], names: list[str], sizes: list[tuple[int, int] | None]) -> list[tuple[str, str]]:
    """(name, reason) of every image whose mask file cannot be read or has another size."""
    from difftrain.data.index import inspect_file

    problems = []
    for key, name, size in zip(keys, names, sizes):
        path = mask_path(key[1] if isinstance(key, tuple) else key)
        if size is None or not path.is_file():
            continue
        mask_size, problem = inspect_file(path)
        if problem:
            problems.append((name, f"its mask {path.name} is {problem}"))
        elif tuple(mask_size) != tuple(size):
            problems.append((name, f"its mask {path.name} is {mask_size[0]}x{mask_size[1]} but the image is "
                                   f"{size[0]}x{size[1]}; masks must have their image's size"))
    return problems


def open_mask(key: str, mode: str, image):
    """The mask of an open (EXIF-rotated) PIL image as an 'L' image, or None (= train everywhere)."""
    from PIL import Image, ImageOps

    if mode == "alpha":
        if image.mode in ("P", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
            image = image.convert("RGBA")
        return image.getchannel("A") if "A" in image.getbands() else None
    path = mask_path(key)
    if not path.is_file():
        return None
    with Image.open(path) as m:
        m = ImageOps.exif_transpose(m)
        return m.convert("L")


@dataclass
class SourceTable:
    """Which source each sample position belongs to and that source's per-sample options."""

    names: list[str]
    source_of: list[int]                        # per position
    rules: list[CaptionRules]
    masks: list[str] = field(default_factory=lambda: ["none"])          # per source: none | files | alpha
    unmasked_weight: list[float] = field(default_factory=lambda: [0.0])
    is_class: list[bool] = field(default_factory=lambda: [False])       # class images of prior preservation
    prior_weight: list[float] = field(default_factory=lambda: [1.0])    # class sources: prior_loss_weight

    @classmethod
    def single(cls, n: int, rules: CaptionRules, masks: str = "none", unmasked_weight: float = 0.0,
               name: str = "data") -> SourceTable:
        return cls([name], [0] * n, [rules], [masks], [unmasked_weight], [False], [1.0])

    @property
    def any_masks(self) -> bool:
        return any(m != "none" for m in self.masks)

    @property
    def any_prior(self) -> bool:
        return any(self.is_class)

    def subset(self, keep: list[int]) -> SourceTable:
        return SourceTable(self.names, [self.source_of[i] for i in keep], self.rules, self.masks,
                           self.unmasked_weight, self.is_class, self.prior_weight)
