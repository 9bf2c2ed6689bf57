"""The `ema` config group: builds an EMA over a model's trainable parameters, saved keyed by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class EMA:
    """EMAModel over the trainable parameters of one model, with name-keyed checkpoint state."""

    def __init__(self, model: torch.nn.Module, **options) -> None:
        from difftrain.components.ema import EMAModel

        offload = options.pop("offload", False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.ema = EMAModel([p for _, p in named], **options)
        self.offload = offload
        if offload:
            self.ema.to(device="cpu")
            if torch.cuda.is_available():
                self.ema.pin_memory()

    def parameters(self, model: torch.nn.Module):
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def step(self, model: torch.nn.Module) -> None:
        self.ema.step(self.parameters(model))

    @property
    def decay(self) -> float:
        return float(self.ema.cur_decay_value or 0.0)

    def swapped(self, model: torch.nn.Module):
        """Context manager: EMA weights in `model` inside, the live weights restored after (always)."""
        return _Swap(self.ema, self.parameters(model))

    def copy_to(self, model: torch.nn.Module) -> None:
        self.ema.copy_to(self.parameters(model))

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        return dict(zip(self.names, self.ema.shadow_params)), meta

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        device = self.ema.shadow_params[0].device if self.ema.shadow_params else "cpu"
        shadows = [tensors[n].to(device=device, dtype=torch.float32) for n in self.names]
        self.ema.load_state_dict({**meta, "shadow_params": shadows})
        if self.offload and torch.cuda.is_available():
            self.ema.pin_memory()


@dataclass
class _Swap:
    ema: object
    params: list

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        return self

    def __exit__(self, *exc):
        self.ema.restore(self.params)
        return False


@dataclass(frozen=True)
class EMAFactory:
    """What the registry builds from the config; the engine calls it with the prepared model."""

    options: dict

    def __call__(self, model: torch.nn.Module) -> EMA:
        return EMA(model, **self.options)


def build_ema(name: str, **options) -> EMAFactory | None:
    return None if name == "off" else EMAFactory(options)
