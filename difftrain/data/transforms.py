"""Resizing in-memory images with the `interpolation` component (the per-file decode, resize and crop of
image folders lives in data/samples.py)."""

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
