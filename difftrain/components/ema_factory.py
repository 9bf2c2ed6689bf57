"""The `ema` config group: an EMAModel over a model's trainable parameters, checkpointed by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class EMA:
    """EMAModel over the trainable (requires_grad) parameters of one model, keyed by parameter name.

    Only trainable parameters are averaged (for LoRA: the adapters, not a copy of the frozen base);
    with `offload` the fp32 shadows live in one CPU buffer allocated once (pinned when CUDA exists).
    """

    def __init__(self, model: torch.nn.Module, **options) -> None:
        from difftrain.components.ema import EMAModel

        self.ema = EMAModel(model.named_parameters(), trainable_only=True, **options)

    def _params(self, model: torch.nn.Module):
        named = dict(model.named_parameters())
        return [named[name] for name in self.ema.param_names]

    def step(self, model: torch.nn.Module) -> None:
        self.ema.step(self._params(model))

    @property
    def decay(self) -> float:
        return float(self.ema.cur_decay_value or 0.0)

    def swapped(self, model: torch.nn.Module):
        """Context manager: the EMA weights inside, the live weights restored after (always)."""
        return self.ema.swapped(self._params(model))

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(name -> fp32 shadow copies, hyper-parameters + step) for safetensors + JSON."""
        tensors = {name: t.detach().clone() for name, t in self.ema.named_state_dict().items()}
        return tensors, self.ema.hparams()

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.ema.load_named_state_dict(tensors, strict=True)
        self.ema.load_state_dict(meta)  # hyper-parameters and optimization_step (no shadows in meta)


@dataclass(frozen=True)
class EMAFactory:
    """What the registry builds from the config; the engine calls it with the model to average."""

    options: dict

    def __call__(self, model: torch.nn.Module) -> EMA:
        return EMA(model, **self.options)


@dataclass(frozen=True)
class PostHocEMAFactory:
    """`ema=posthoc`: a components.posthoc_ema.PostHocEMA (same interface as EMA; snapshots once bound to a run)."""

    sigma_rels: tuple
    snapshot_every: int
    snapshot_dtype: str

    def __call__(self, model: torch.nn.Module):
        from difftrain.components.posthoc_ema import PostHocEMA

        return PostHocEMA(model, self.sigma_rels, self.snapshot_every, self.snapshot_dtype)


def build_ema(options) -> EMAFactory | None:
    """Registry target of the `ema` group (`options`: config/schema.py EMAConfig or EMAOffConfig)."""
    if options.name == "none":
        return None
    if options.name == "posthoc":
        from difftrain.components.posthoc_ema import SIGMA_REL_MAX
        from difftrain.errors import UserError

        values = list(options.sigma_rels)
        if not values or len(set(values)) != len(values) or not all(0 < v <= SIGMA_REL_MAX for v in values):
            raise UserError(f"ema.sigma_rels={values} must be one or more distinct values in (0, "
                            f"{SIGMA_REL_MAX:.4f}] (the largest relative std a power-function EMA has); "
                            "e.g. ema.sigma_rels=[0.05,0.1]")
        return PostHocEMAFactory(tuple(options.sigma_rels), options.snapshot_every, options.snapshot_dtype)
    keys = dataclasses.asdict(options)
    del keys["name"]
    return EMAFactory(keys)
