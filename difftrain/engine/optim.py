"""Optimizers and LR schedules (diffusers.optimization), stepped once per optimizer step."""

from __future__ import annotations

import torch

from difftrain.errors import UserError


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8, momentum: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                            "(it needs a CUDA GPU), or use optimizer=adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    raise UserError(f"unknown optimizer {name!r}")


def build_lr_scheduler(name: str, optimizer, max_steps: int, warmup_steps: int = 0,
                       num_cycles: float = 0.5, power: float = 1.0):
    """diffusers' schedules over `max_steps` real optimizer steps (never scaled by the world size)."""
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if name == "cosine":
        kwargs["num_cycles"] = num_cycles
    elif name == "cosine_with_restarts":
        kwargs["num_cycles"] = int(num_cycles)
    elif name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps if name != "constant" else None,
                         num_training_steps=max_steps, **kwargs)
