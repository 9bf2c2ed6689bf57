"""What a model family is to the engine and the CLI: a Protocol, not a base class.

A family owns the whole life of one kind of model: it is built from its validated `model` options,
prepared once before the optimizer exists (dtypes, adapters, caches), turns data batches into
(x0, conditioning), calls its denoiser, says what a checkpoint holds, generates images (validation
grids, evaluation, `difftrain sample`), exports `final/` in diffusers' formats, and loads a finished
run back for inference. The engine never asks which family it has; adding one is one file in
`difftrain/families/`, one `register()` line and one `conf/model/<name>.yaml`.

Each registered `model` option targets a class that satisfies `FamilyClass`: calling it builds the
family (`ModelFamily`), and its `load_finished` classmethod reads a run folder for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class CacheOptions:
    """What the engine asks a family to cache, resolved from `data.cache_*` by engine/setup.py."""

    latents: bool = False              # VAE latent distributions of every sample (both flips with random_flip)
    text: bool | None = None           # prompt embeddings; None = when the text encoders are frozen
    folder: Path | None = None         # where cache files live (data.cache_dir or RUN_DIR/cache)
    prune: bool = True                 # keep only the newest file of each kind (the run's own folder)
    fill: str = "auto"                 # data.cache_fill: lazy | ahead | auto (data/cache.py)
    num_workers: int = 0               # DataLoader workers decoding images for the latent cache
    key_fields: tuple[tuple[str, Any], ...] = ()  # data options that change cached content (crop, filter)


@dataclass(frozen=True)
class SampleRequest:
    """Images to generate: class labels or prompts, `per_condition` of each (of an unconditional model:
    `per_condition` in all), and how."""

    labels: tuple[int, ...] | None = None
    prompts: tuple[str, ...] | None = None
    per_condition: int = 4
    steps: int = 50
    seed: int = 0
    guidance_scale: float | None = None  # None = the pipeline's default
    size: tuple[int, int] | None = None  # (height, width); None = the training size


@runtime_checkable
class ModelFamily(Protocol):
    name: str                 # the `model` option (recorded in config.yaml, final/difftrain.json)
    module: torch.nn.Module   # the trainable module: handed to the optimizer and to accelerate
    size_multiple: int        # image sides must be multiples of this (buckets are built from it)

    def training_schedule(self, configured):
        """The NoiseSchedule to train with: `configured` (built from the `scheduler` group) or the
        pretrained pipeline's own."""

    def prepare(self, data, accelerator, lora, caches: CacheOptions, validation_prompts: list[str]) -> None:
        """Once, before the optimizer is built: weight dtypes, adapters (`lora` is a LoraSpec or None),
        caches, validation prompt embeddings."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """(x0, conditioning kwargs) of one micro-batch on `device`; random draws from `generator`."""

    def predict(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's output for x_t (model = the possibly accelerate-wrapped `module`)."""

    def checkpoint_tensors(self, model) -> dict[str, torch.Tensor]: ...

    def load_checkpoint_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None: ...

    def validation_request(self, validation: dict, data) -> SampleRequest:
        """The sample grid of a validation pass (labels or prompts from the `validation` section)."""

    def generate(self, model, schedule, request: SampleRequest, device) -> tuple[torch.Tensor, int]:
        """(images in [-1, 1] as (N, C, H, W) on the CPU, grid row length)."""

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        """Write `final/` (EMA weights when `ema` is set) in the formats diffusers loads."""

    def flush_caches(self) -> None:
        """Write what lazily filled caches computed so far (at checkpoints and when the loop stops)."""


@runtime_checkable
class FinishedRun(Protocol):
    """A finished run loaded for inference by `difftrain sample` / `difftrain eval`."""

    family: str                   # the `model` option of the run
    conditioning: str | None      # what a request names: "labels", "prompts" or None (unconditional)
    num_classes: int | None       # labels lie in [0, num_classes) when conditioning == "labels"
    resolution: int               # the training resolution (what a request with resolution=None gets)

    def generate(self, request: SampleRequest) -> tuple[torch.Tensor, int]:
        """(images in [-1, 1] as (N, C, H, W) on the CPU, grid row length); the same generation as the
        family's `generate` during training."""


class FamilyClass(Protocol):
    """The registry target of a `model` option."""

    def __call__(self, **options) -> ModelFamily: ...

    def size_multiple_of(self, options) -> int:
        """`ModelFamily.size_multiple` from the options and config files alone (no weights loaded):
        `difftrain data-report` plans buckets with it."""

    def load_finished(self, run_dir: Path, cfg: dict, device: str, checkpoint_tensors) -> FinishedRun:
        """The run's outputs for inference: `final/` when it exists, else `checkpoint_tensors()` (the latest
        checkpoint's weights with the EMA weights laid over them; raises UserError when there is none)."""
