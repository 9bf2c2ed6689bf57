"""The protocol methods the latent text-to-image families (sd15, sd3) hand to their `LatentTextToImage`.

A family class keeps what is its own (building the spec from its pipeline, `training_schedule`,
`load_finished`) and mixes this in for the rest: plain forwarding to `self.t2i`, no hooks to override.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.families.protocol import CacheOptions, SampleRequest
from difftrain.families.t2i import pixel_multiple


class ForwardsToLatentTextToImage:
    t2i: object  # families.t2i.LatentTextToImage, set by the family's __init__

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: VAE factor x the denoiser's latent multiple (and of 8, which the
        diffusers pipelines require)."""
        return pixel_multiple(self.t2i.vae_scale_factor, self.t2i.spec.latent_multiple)

    def prepare(self, data, accelerator, lora, caches: CacheOptions, validation_prompts: list[str]) -> None:
        self.t2i.prepare(data, accelerator, lora, caches, validation_prompts)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.t2i.trainable_parameters()

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        return self.t2i.inputs(batch, device, generator)

    def predict(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.t2i.predict(model, x_t, timesteps, cond)

    def checkpoint_tensors(self, model) -> dict[str, torch.Tensor]:
        return self.t2i.checkpoint_tensors(model)

    def load_checkpoint_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        self.t2i.load_checkpoint_tensors(model, tensors)

    def validation_request(self, validation: dict, data) -> SampleRequest:
        return self.t2i.validation_request(validation, data)

    def generate(self, model, schedule, request: SampleRequest, device) -> tuple[torch.Tensor, int]:
        return self.t2i.generate(model, schedule, request, device)

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        self.t2i.export(final_dir, model, ema, schedule)

    def flush_caches(self) -> None:
        self.t2i.flush_caches()
