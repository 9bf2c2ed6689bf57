"""Model families: what the engine trains and how to condition, call, sample and export it.

The engine only talks to a `ModelBundle`: `inputs()` turns a data batch into (x0, cond), `predict()`
calls the (possibly accelerate-wrapped) denoiser, `validation_images()` makes the sample grid and
`export()` writes diffusers folders. A family (class-conditional UNet2D here; latent text-to-image
families elsewhere) subclasses it; the loop stays the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.errors import UserError


class ModelBundle:
    """Base: a pixel-space denoiser conditioned on optional class labels."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model  # the trainable module (handed to the optimizer and accelerate)

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def inputs(self, batch: dict, device) -> tuple[torch.Tensor, dict]:
        """(x0, conditioning kwargs) of one micro-batch, on `device`."""
        labels = batch.get("labels")
        return batch["pixels"].to(device), {"class_labels": None if labels is None else labels.to(device)}

    def predict(self, model, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, timesteps, return_dict=False, **cond)[0]

    def validation_images(self, model, schedule, data, vcfg: dict, device) -> tuple[torch.Tensor, int]:
        """(images in [-1, 1], grid row length) for the validation grid."""
        from difftrain.engine.sampling import sample

        per_label = vcfg["num_per_label"]
        labels = None
        if data.num_classes:
            labels = torch.tensor(vcfg["labels"]).repeat_interleave(per_label)
        n = len(labels) if labels is not None else per_label * 8
        cond = {"class_labels": None if labels is None else labels.to(device)}
        shape = (n, *data.images.shape[1:])
        images = sample(lambda x, t: self.predict(model, x, t, cond), schedule, shape,
                        vcfg["inference_steps"], vcfg["seed"], device)
        return images, per_label if labels is not None else 8

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        """final/unet = EMA weights (raw ones in final/unet_raw when EMA is on); final/scheduler."""
        model.save_pretrained(final_dir / ("unet_raw" if ema is not None else "unet"))
        if ema is not None:
            with ema.swapped(model):
                model.save_pretrained(final_dir / "unet")
        schedule.scheduler.save_pretrained(final_dir / "scheduler")


def build_unet2d(name: str, pretrained: str | None = None, **config) -> ModelBundle:
    """A UNet2DModel from its config keys, or loaded with from_pretrained (hub id or local folder)."""
    from diffusers import UNet2DModel

    if pretrained:
        local = Path(pretrained).expanduser()
        subfolder = "unet" if (local / "unet" / "config.json").is_file() else None
        try:
            model = UNet2DModel.from_pretrained(str(local) if local.exists() else pretrained, subfolder=subfolder)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load model.pretrained='{pretrained}' as a UNet2DModel ({exc}); "
                            "give a local folder made with save_pretrained or a reachable hub id") from None
        return ModelBundle(model)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return ModelBundle(UNet2DModel(**kwargs))
