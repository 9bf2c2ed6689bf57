"""Denoisers: build or load a diffusers model, and call it the same way for every family."""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.errors import UserError


def build_unet2d(name: str, pretrained: str | None = None, **config) -> torch.nn.Module:
    """A UNet2DModel from its config keys, or loaded with from_pretrained (hub id or local folder)."""
    from diffusers import UNet2DModel

    if pretrained:
        local = Path(pretrained).expanduser()
        subfolder = "unet" if (local / "unet" / "config.json").is_file() else None
        try:
            return UNet2DModel.from_pretrained(str(local) if local.exists() else pretrained, subfolder=subfolder)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load model.pretrained='{pretrained}' as a UNet2DModel ({exc}); "
                            "give a local folder made with save_pretrained or a reachable hub id") from None
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return UNet2DModel(**kwargs)


def denoise(model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None):
    """One call convention for the engine: returns the model's prediction tensor."""
    out = model(x, timesteps, class_labels=labels, return_dict=False)
    return out[0]
