"""Model families: what the engine trains and how to condition, call, sample and export it.

The engine only talks to a `ModelBundle`: `training_schedule()` may replace the scheduler group's
schedule (pretrained pipelines bring their own), `prepare()` sets the bundle up once before the optimizer
is built (dtypes, adapters, caches), `inputs()` turns a data batch into (x0, cond), `predict()` calls the
(possibly accelerate-wrapped) denoiser, `checkpoint_tensors()`/`load_checkpoint_tensors()` say what a
checkpoint holds, `validation_images()` makes the sample grid and `export()` writes diffusers folders.
A family (class-conditional UNet2D here; latent text-to-image families in difftrain/engine/families/)
subclasses it; the loop stays the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.errors import UserError


class ModelBundle:
    """Base: a pixel-space denoiser conditioned on optional class labels."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model  # the trainable module (handed to the optimizer and accelerate)
        # folder labels feed the model only if it has a class embedding (num_class_embeds set)
        self.class_conditional = getattr(getattr(model, "config", None), "num_class_embeds", None) is not None

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_schedule(self, scheduler_cfg: dict):
        """A NoiseSchedule that replaces the one built from the `scheduler` group, or None to keep it."""

    def prepare(self, cfg: dict, data, run_dir: Path, accelerator) -> None:
        """Called once by the Trainer after data and bundle are built, before the optimizer."""

    def checkpoint_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores (model.safetensors)."""
        return model.state_dict()

    def load_checkpoint_tensors(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors)

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """(x0, conditioning kwargs) of one micro-batch, on `device`; random draws (if any) from `generator`."""
        labels = batch.get("labels") if self.class_conditional else None
        return batch["pixels"].to(device), {"class_labels": None if labels is None else labels.to(device)}

    def predict(self, model, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, timesteps, return_dict=False, **cond)[0]

    def validation_images(self, model, schedule, data, vcfg: dict, device) -> tuple[torch.Tensor, int]:
        """(images in [-1, 1], grid row length) for the validation grid."""
        from difftrain.components.sampling import sample

        per_label = vcfg["num_per_label"]
        labels = None
        if data.num_classes and self.class_conditional:
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
