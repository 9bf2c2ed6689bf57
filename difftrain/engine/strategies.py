"""How one run's weights are saved, loaded and gathered under each engine: DDP (also one process) or DeepSpeed
(FSDP2: engine/strategy_fsdp.py, the same protocol).

The Trainer talks to one `Strategy`; it never asks which engine it has:

* `save(tmp)` writes the weights and optimizer state of a checkpoint into its temporary folder. DDP: rank 0
  writes the family's checkpoint tensors and `optimizer.pt`. DeepSpeed: collective; every rank writes its
  engine shards into `tmp/deepspeed/` (`engine.save_checkpoint`), then rank 0 writes the full weights.
* `load(path)` is the reverse (DeepSpeed: every rank loads its own shards).
* `full_state_dict()` is the module's full state dict on rank 0 (collective under DeepSpeed).
* `eval_copy()` is the module rank 0 validates, evaluates and exports. Under ZeRO-3 (weights partitioned) or
  DeepSpeed bf16/fp16 (module weights rounded) it is a plain copy filled with the full fp32 weights, made
  once and kept; otherwise the unwrapped module itself. Every rank must call it (the others get None).
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.engine import checkpoint as ckpt
from difftrain.errors import UserError

DS_TAG = "deepspeed"  # the engine-state subfolder inside checkpoint-N/


class DDPStrategy:
    """torch DDP through accelerate, or a single process (no wrapper at all)."""

    name = "ddp"

    def __init__(self, accelerator, model, optimizer, family) -> None:
        self.accelerator, self.model, self.optimizer, self.family = accelerator, model, optimizer, family
        self.is_main = accelerator.is_main_process

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The module inside DDP (and inside a torch.compile wrapper): accelerate's unwrap_model would import
        DeepSpeed whenever it is installed, and DeepSpeed prints its accelerator warning on import."""
        inner = self.model
        while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or \
                hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod if hasattr(inner, "_orig_mod") else inner.module
        return inner

    def save(self, tmp: Path) -> None:
        if self.is_main:
            ckpt.write_tensors(tmp, "model.safetensors", self.family.checkpoint_tensors(self.unwrapped))
            ckpt.write_torch(tmp, "optimizer.pt", self.optimizer.state_dict())

    def load(self, path: Path) -> None:
        self.family.load_checkpoint_tensors(self.unwrapped, ckpt.read_tensors(path, "model.safetensors"))
        self.optimizer.load_state_dict(ckpt.read_torch(path, "optimizer.pt"))

    def full_state_dict(self) -> dict | None:
        return self.unwrapped.state_dict() if self.is_main else None

    def eval_copy(self) -> torch.nn.Module | None:
        return self.unwrapped

    def cast_half_inputs(self) -> None:
        """Only DeepSpeed casts the module itself; accelerate's autocast handles DDP."""


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO-1/2/3 through accelerate's DeepSpeedPlugin."""

    def __init__(self, accelerator, model, optimizer, family) -> None:
        super().__init__(accelerator, model, optimizer, family)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        self.stage = int(ds["zero_optimization"]["stage"])
        self.name = f"deepspeed_zero{self.stage}"
        # the dtype DeepSpeed casts the module to (bf16/fp16), or None (fp32)
        self.half_dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float16 if ds["fp16"]["enabled"] else None
        self._plain_copy: torch.nn.Module | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)  # the module inside the DeepSpeed engine

    def save(self, tmp: Path) -> None:
        self.accelerator.wait_for_everyone()  # rank 0 has created tmp
        self.model.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)  # collective
        weights = self.full_state_dict()
        if self.is_main:
            ckpt.write_tensors(tmp, "model.safetensors", weights)

    def load(self, path: Path) -> None:
        if not (path / DS_TAG).is_dir():
            raise UserError(f"checkpoint '{path}' holds no DeepSpeed engine state ({DS_TAG}/); resume it with the "
                            "distributed option it was written with")
        loaded, _ = self.model.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)  # the LR schedule is difftrain's
        if loaded is None:
            raise UserError(f"DeepSpeed could not load the engine state in '{path / DS_TAG}'")

    def full_state_dict(self) -> dict | None:
        """ZeRO-3 gathers the partitions; with bf16/fp16 the trainable weights are DeepSpeed's fp32 master
        copies (`safe_get_full_fp32_param`), not the rounded module weights."""
        state = self.accelerator.get_state_dict(self.model)  # collective under ZeRO-3
        if self.half_dtype is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in self.unwrapped.named_parameters():  # same order on every rank
                if param.requires_grad:
                    full = safe_get_full_fp32_param(param)  # collective under ZeRO-3
                    if self.is_main and full is not None:
                        state[name] = full.detach().float().cpu()
        return state if self.is_main else None

    def eval_copy(self) -> torch.nn.Module | None:
        if self.stage < 3 and self.half_dtype is None:
            return self.unwrapped
        state = self.full_state_dict()
        if not self.is_main:
            return None
        if self._plain_copy is None:
            module = self.unwrapped
            if not hasattr(type(module), "from_config"):
                raise UserError("validation and export under ZeRO-3 or DeepSpeed half precision need a diffusers "
                                "model (with from_config)")
            self._plain_copy = type(module).from_config(module.config).to(self.accelerator.device)
        self._plain_copy.load_state_dict(state)
        return self._plain_copy

    def cast_half_inputs(self) -> None:
        """DeepSpeed bf16/fp16 casts the module itself (accelerate's autocast is off under DeepSpeed): cast
        floating inputs with two or more dims (samples, hidden states) to the module's dtype. Timesteps
        (0-d/1-d) keep full precision (bf16 cannot represent 999)."""
        cast_half_inputs(self.unwrapped, self.half_dtype)


def strategy_for(accelerator, model, optimizer, family) -> DDPStrategy:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from difftrain.engine.strategy_fsdp import FSDP2Strategy  # distributed=fsdp2

        return FSDP2Strategy(accelerator, model, optimizer, family)
    cls = DeepSpeedStrategy if accelerator.distributed_type == DistributedType.DEEPSPEED else DDPStrategy
    return cls(accelerator, model, optimizer, family)


def cast_half_inputs(module: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """A forward pre-hook on `module` that casts floating inputs with two or more dims (samples, hidden states)
    to `dtype`; timesteps (0-d/1-d) keep full precision (bf16 cannot represent 999). None: nothing."""
    if dtype is None:
        return

    def cast(x):
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() and x.ndim >= 2 else x

    def hook(_module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)
