"""Image transforms: decode, resize with the `interpolation` component, crop (center or seeded random)."""

from __future__ import annotations

import torch


def resize_tensor(images: torch.Tensor, resolution: int, interpolation) -> torch.Tensor:
    """Resize (N, C, H, W) float images in [0, 1] through PIL so every interpolation mode works."""
    from torchvision.transforms import functional as TF

    out = []
    for img in images:
        pil = TF.to_pil_image(img)
        pil = TF.resize(pil, [resolution, resolution], interpolation=interpolation)
        out.append(TF.pil_to_tensor(pil).float() / 255.0)
    return torch.stack(out)


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
