"""model=unet2d: a pixel-space UNet2DModel, class-conditional when it has a class embedding.

The family trains with the schedule built from the `scheduler` group, feeds the data's labels to the model
only when it has a class embedding (`num_class_embeds` set), and samples every grid (validation, the digits
evaluation, `difftrain sample`) through one denoise closure around `predict` (components/sampling.py runs
the loop). `final/unet` (EMA weights; raw ones in `final/unet_raw` when EMA is on) loads with
`UNet2DModel.from_pretrained`; `final/scheduler` is the training scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.errors import UserError
from difftrain.families.loading import downsampling
from difftrain.families.protocol import CacheOptions, SampleRequest

UNCONDITIONAL_ROW = 8  # grid row length of unconditional samples


def load_unet2d(pretrained: str):
    """A UNet2DModel from a local folder (its own, or a pipeline's unet/ subfolder) or a hub id."""
    from diffusers import UNet2DModel

    local = Path(pretrained).expanduser()
    subfolder = "unet" if (local / "unet" / "config.json").is_file() else None
    try:
        return UNet2DModel.from_pretrained(str(local) if local.exists() else pretrained, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model.pretrained='{pretrained}' as a UNet2DModel ({exc}); "
                        "give a local folder made with save_pretrained or a reachable hub id") from None


class UNet2DFamily:
    """ModelFamily of a pixel-space denoiser conditioned on optional class labels (registry target)."""

    def __init__(self, options) -> None:
        """Built from its UNet2DModel config keys, or loaded from `options.pretrained` (hub id or local folder).
        `options`: config/schema.py UNet2DConfig."""
        import dataclasses

        from diffusers import UNet2DModel

        self.name = options.name
        self.label_dropout, self.guidance_scale = options.label_dropout, options.guidance_scale
        if options.pretrained:
            self.module = load_unet2d(options.pretrained)
        else:
            keys = dataclasses.asdict(options)
            for key in ("name", "pretrained", "label_dropout", "guidance_scale"):
                del keys[key]
            if self.label_dropout and keys["num_class_embeds"] is not None:
                keys["num_class_embeds"] += 1  # the last embedding is 'no label' (classifier-free guidance)
            self.module = UNet2DModel(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in keys.items()})
        model_config = self.module.config
        # folder labels feed the model only if it has a class embedding (num_class_embeds set)
        self.class_conditional = model_config.num_class_embeds is not None
        guided = self.class_conditional and (self.label_dropout > 0 or self.guidance_scale != 1)
        self.null_label = model_config.num_class_embeds - 1 if guided else None
        self.channels = int(model_config.in_channels)
        size = model_config.sample_size
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.size_multiple = downsampling(model_config)  # self.size becomes the data's validation size in prepare

    # ---- training ---------------------------------------------------------------------------------
    def training_schedule(self, configured):
        return configured

    def prepare(self, data, accelerator, lora, caches: CacheOptions, validation_prompts: list[str]) -> None:
        """Nothing to cast or cache (lora, caches and prompts are text-to-image options, rejected by the
        config rules for this family); samples take the data's image shape."""
        self.channels, self.size = int(data.channels), tuple(data.validation_size)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Pixels and labels; with label_dropout each label is replaced by the 'no label' class with that
        probability (one draw per sample from the step's generator, so resume replays it; the fixed validation
        inputs, asked for without a generator, keep every label)."""
        labels = batch.get("labels") if self.class_conditional else None
        if labels is not None and self.label_dropout and generator is not None:
            dropped = torch.rand(labels.shape, generator=generator) < self.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        return batch["pixels"].to(device), {"class_labels": None if labels is None else labels.to(device)}

    @classmethod
    def size_multiple_of(cls, options) -> int:
        """2^(levels - 1): the UNet halves the image at every level but the last."""
        if options.pretrained:
            local = Path(options.pretrained).expanduser()
            config = local / "unet" / "config.json" if (local / "unet").is_dir() else local / "config.json"
            if config.is_file():
                import json

                return downsampling(json.loads(config.read_text()))
            return downsampling(dict(load_unet2d(options.pretrained).config))
        return downsampling({"block_out_channels": options.block_out_channels})

    def predict(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x_t, timesteps, return_dict=False, **cond)[0]

    def checkpoint_tensors(self, model) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_checkpoint_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors)

    # ---- generation -------------------------------------------------------------------------------
    def validation_request(self, validation: dict, data) -> SampleRequest:
        """`validation.labels`, `num_per_label` of each (unconditional: 8 rows of `num_per_label`)."""
        per_label = validation["num_per_label"]
        labels = tuple(validation["labels"]) if data.num_classes and self.class_conditional else None
        count = per_label if labels is not None else per_label * UNCONDITIONAL_ROW
        return SampleRequest(labels=labels, per_condition=count, steps=validation["inference_steps"],
                             seed=validation["seed"])

    def generate(self, model, schedule, request: SampleRequest, device) -> tuple[torch.Tensor, int]:
        """`per_condition` samples of each label (repeat_interleave'd: one grid row per label), or
        `per_condition` unconditional ones; the one denoise closure of this family."""
        from difftrain.components.sampling import sample

        labels = None
        if request.labels is not None:
            labels = torch.tensor(request.labels).repeat_interleave(request.per_condition)
        count = len(labels) if labels is not None else request.per_condition
        class_labels = labels.to(device) if labels is not None and self.class_conditional else None
        cond = {"class_labels": class_labels}
        height, width = request.size or self.size
        scale = request.guidance_scale if request.guidance_scale is not None else self.guidance_scale
        if class_labels is not None and scale != 1 and self.null_label is not None:
            both = {"class_labels": torch.cat([class_labels, torch.full_like(class_labels, self.null_label)])}

            def denoise(x, t):  # classifier-free guidance: one batch of (label, no label)
                labelled, unlabelled = self.predict(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
                return unlabelled + scale * (labelled - unlabelled)
        else:
            def denoise(x, t):
                return self.predict(model, x, t, cond)
        images = sample(denoise, schedule, (count, self.channels, height, width), request.steps, request.seed, device)
        return images, request.per_condition if labels is not None else UNCONDITIONAL_ROW

    def flush_caches(self) -> None:
        """Nothing is cached for a pixel-space UNet."""

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        """final/unet = EMA weights (raw ones in final/unet_raw when EMA is on); final/scheduler."""
        model.save_pretrained(final_dir / ("unet_raw" if ema is not None else "unet"))
        if ema is not None:
            with ema.swapped(model):
                model.save_pretrained(final_dir / "unet")
        schedule.scheduler.save_pretrained(final_dir / "scheduler")

    # ---- a finished run ---------------------------------------------------------------------------
    @classmethod
    def load_finished(cls, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedUNet2D:
        """final/unet when present, else the model built from cfg["model"] with the latest checkpoint's
        (EMA) weights; sampled with the run's `scheduler` group and at its data resolution."""
        from difftrain import registry
        from difftrain.config.schema import UNet2DConfig

        final = run_dir / "final" / "unet"
        guidance = {k: cfg["model"][k] for k in ("label_dropout", "guidance_scale") if k in cfg["model"]}
        if (final / "config.json").is_file():
            family = cls(UNet2DConfig(name=cfg["model"]["name"], pretrained=str(final), **guidance))
        else:
            family = cls(UNet2DConfig(**{**cfg["model"], "pretrained": None}))
            family.load_checkpoint_tensors(family.module, checkpoint_tensors())
        family.size = (int(cfg["data"]["resolution"]),) * 2
        family.module.to(device).eval()
        return FinishedUNet2D(family, registry.build("scheduler", cfg["scheduler"]), device)


class FinishedUNet2D:
    """A finished unet2d run for `difftrain sample` / `difftrain eval` (protocol.FinishedRun)."""

    def __init__(self, unet2d: UNet2DFamily, schedule, device: str) -> None:
        self.unet2d, self.schedule, self.device = unet2d, schedule, device
        self.family = unet2d.name
        self.conditioning = "labels" if unet2d.class_conditional else None
        classes = unet2d.module.config.num_class_embeds
        self.num_classes = classes - 1 if classes is not None and unet2d.null_label is not None else classes
        self.resolution = unet2d.size[0]

    def generate(self, request: SampleRequest) -> tuple[torch.Tensor, int]:
        return self.unet2d.generate(self.unet2d.module, self.schedule, request, self.device)
