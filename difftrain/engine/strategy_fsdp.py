"""distributed=fsdp2: torch's FSDP2 (`fully_shard`) through accelerate's FSDP plugin, version 2.

* **Units.** `fully_shard` is applied to every repeated block of the denoiser, then to the whole module (the
  root unit holds what is left: stems, embeddings, the output head). The block classes are taken from the model
  at `accelerator.prepare` (`block_class_names`): the classes of the entries of `down_blocks`, `up_blocks` and
  of `mid_block` (UNets), of `transformer_blocks` and `single_transformer_blocks` (SD3, FLUX.1), and diffusers'
  own `_repeated_blocks`, read from the denoiser (the model itself, or the `denoiser` of the text-to-image
  families' T2IModule). A model with none of these is one unit (sharded, but gathered whole for its forward).
* **Precision.** `trainer.mixed_precision=bf16|fp16`: parameters are gathered in that dtype for compute and
  gradients reduced in fp32 (`MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`); the shards, the
  optimizer and every saved weight stay fp32. Floating inputs of two or more dimensions are cast to the compute
  dtype; timesteps keep full precision (as under DeepSpeed). Activation checkpointing is the model's own
  (`trainer.gradient_checkpointing`), not the plugin's.
* **Checkpoints** (inside the transaction of engine/checkpoint.py, the strategy only writes into `tmp`): every
  rank writes its shards of the trainable weights and of the optimizer state with torch.distributed.checkpoint
  into `tmp/fsdp/` (`.metadata` + one `__<rank>_0.distcp` per rank: no rank ever holds the full optimizer
  state); then rank 0 writes the full trainable weights to `model.safetensors` (for `difftrain sample`/`eval`
  and for reading without torch.distributed). Resume reads the shards back (same world size, as every engine).
* **EMA** keeps full fp32 shadows on every rank; `components/ema_gather.py` gathers the sharded parameters
  (DTensor `full_tensor()`) in groups of at most 256 MiB for each step.
* **eval_copy()** (validation, evaluation, export) is a plain module of the model's own class on rank 0, made
  once, into which the full weights are gathered (`get_model_state_dict(full_state_dict=True)`, collective);
  it costs one unsharded model on rank 0, as under ZeRO-3. Diffusers models in it are made `from_config`
  with the LoRA adapters of their `peft_config`; a container around them (the T2IModule of families/t2i.py)
  is a fresh instance of its class with the same plain attributes and rebuilt children (`_plain_module`), so
  exports are plain diffusers files (no DTensor, no wrapper prefixes).
* **CPU.** accelerate only turns its FSDP plugin on for accelerator devices; on a machine without one (gloo),
  difftrain sets accelerate's state to FSDP itself after the Accelerator is built (`_after_init`), which is
  what accelerate does on GPUs. torch's FSDP2 runs on CPU tensors with gloo.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from difftrain.engine import checkpoint as ckpt
from difftrain.engine.distributed import _handlers, _single_process_env, has_accelerator
from difftrain.engine.strategies import cast_half_inputs
from difftrain.errors import UserError

FSDP_DIR = "fsdp"  # the torch.distributed.checkpoint folder inside checkpoint-N/
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def _denoiser(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose blocks become units: the `denoiser` a T2IModule wraps (families/t2i.py), or the model."""
    inner = getattr(model, "denoiser", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def block_class_names(model: torch.nn.Module) -> list[str]:
    """The class names that get their own `fully_shard` unit (module docstring), in first-seen order."""
    model = _denoiser(model)
    names = [type(child).__name__ for attr in BLOCK_LISTS for child in (getattr(model, attr, None) or ())]
    mid = getattr(model, "mid_block", None)
    if isinstance(mid, torch.nn.Module):
        names.append(type(mid).__name__)
    present = {type(m).__name__ for m in model.modules()}
    names += [n for n in (getattr(type(model), "_repeated_blocks", None) or ()) if n in present]
    return list(dict.fromkeys(names))


class BlockwiseFSDP2Plugin(FullyShardedDataParallelPlugin):
    """accelerate's FSDP plugin whose transformer-based wrap policy takes its classes from the model itself
    (accelerate calls `set_auto_wrap_policy(model)` first thing in `prepare`)."""

    def set_auto_wrap_policy(self, model):
        self.transformer_cls_names_to_wrap = block_class_names(model)
        return super().set_auto_wrap_policy(model)


def _half_dtype(mixed_precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def fsdp2_accelerator_kwargs(options, trainer: dict) -> dict:
    """Accelerator kwargs for `distributed=fsdp2` (`options`: config/schema_distributed.py FSDP2Config)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        raise UserError("distributed=fsdp2 does not run with `accelerate launch --cpu`: drop --cpu (on a machine "
                        "without GPUs FSDP2 runs on the CPU with gloo by itself)")
    _single_process_env()  # a launcher-less run is a process group of one (accelerate's FSDP needs a group)
    on_cpu = not has_accelerator()
    half = _half_dtype(trainer["mixed_precision"])
    policy = (MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if half is not None else None)
    plugin = BlockwiseFSDP2Plugin(
        fsdp_version=2, reshard_after_forward=bool(options.reshard_after_forward),
        cpu_offload=bool(options.cpu_offload), auto_wrap_policy="transformer_based_wrap",
        mixed_precision_policy=policy, activation_checkpointing=False, state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False)
    # CPU offload gathers full state dicts on CPU tensors: the process group needs gloo next to nccl
    backend = "gloo" if on_cpu else "cuda:nccl,cpu:gloo" if options.cpu_offload else None
    return {"fsdp_plugin": plugin, "kwargs_handlers": _handlers(backend, options.timeout_s), "cpu": on_cpu,
            "after_init": functools.partial(_after_init, plugin, os.environ.get("ACCELERATE_USE_FSDP"))}


def _after_init(plugin, launcher_flag: str | None, accelerator) -> None:
    """accelerate leaves a gloo/CPU run at MULTI_CPU and ignores the FSDP plugin; turn it into the FSDP state
    accelerate builds on GPUs (accelerate/state.py: distributed_type FSDP + fsdp_plugin, mirrored into
    PartialState's shared state, which every later AcceleratorState() copies). The ACCELERATE_USE_FSDP flag the
    Accelerator sets is put back as the launcher left it (only XLA reads it later), so that the next job of a
    sweep in this process is not taken for an `accelerate launch --use_fsdp` run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if launcher_flag is None:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    else:
        os.environ["ACCELERATE_USE_FSDP"] = launcher_flag
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
    if not accelerator.is_fsdp2:
        raise UserError(f"distributed=fsdp2: accelerate set up {state.distributed_type} instead of FSDP; launch "
                        "with `accelerate launch --num_processes N` or torchrun (not --cpu)")


def _original_class(module: torch.nn.Module) -> type:
    """fully_shard swaps the module's class for FSDP<cls>(FSDPModule, cls); the model's own class."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule))
    return cls


class FSDP2Strategy:
    """FSDP2 through accelerate (engine/strategies.py has the protocol; the module docstring the design)."""

    name = "fsdp2"

    def __init__(self, accelerator, model, optimizer, family) -> None:
        self.accelerator, self.model, self.optimizer, self.family = accelerator, model, optimizer, family
        self.is_main = accelerator.is_main_process
        policy = accelerator.state.fsdp_plugin.mixed_precision_policy
        self.half_dtype = getattr(policy, "param_dtype", None) if policy is not None else None
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self._plain_copy: torch.nn.Module | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model  # fully_shard works in place: the same module, the same parameter names

    def _torch_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's AcceleratedOptimizer

    def _sharded_state(self) -> dict:
        """This rank's shards: trainable weights (and buffers; not the frozen base) and optimizer state."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        weights = {k: v for k, v in get_model_state_dict(self.model).items() if k not in self.frozen}
        return {"model": weights, "optimizer": get_optimizer_state_dict(self.model, self._torch_optimizer())}

    def save(self, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp

        self.accelerator.wait_for_everyone()  # rank 0 has created tmp
        dcp.save(self._sharded_state(), checkpoint_id=str(tmp / FSDP_DIR))  # collective: every rank its shards
        plain = self.eval_copy()  # collective
        if self.is_main:
            ckpt.write_tensors(tmp, "model.safetensors", self.family.checkpoint_tensors(plain))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (path / FSDP_DIR / ".metadata").is_file():
            raise UserError(f"checkpoint '{path}' holds no FSDP2 shards ({FSDP_DIR}/); resume it with the "
                            "distributed option it was written with")
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path / FSDP_DIR))  # every rank reads its own shards
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.model, self._torch_optimizer(), state["optimizer"])

    def full_state_dict(self) -> dict | None:
        """The full weights on rank 0, on the CPU (collective: one all-gather per tensor)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def eval_copy(self) -> torch.nn.Module | None:
        state = self.full_state_dict()
        if not self.is_main:
            return None
        if self._plain_copy is None:
            self._plain_copy = self._plain_module()
        self._plain_copy.load_state_dict(state, assign=True)  # the state's dtypes (a bf16 base stays bf16)
        return self._plain_copy.to(self.accelerator.device)

    def _plain_module(self) -> torch.nn.Module:
        plain = _plain_module(self.model)
        for name, p in plain.named_parameters():
            p.requires_grad_(name not in self.frozen)  # family.checkpoint_tensors keeps the trainable ones
        return plain.eval()

    def cast_half_inputs(self) -> None:
        """Floating inputs with two or more dims (samples, hidden states) go to the compute dtype; timesteps
        keep full precision (bf16 cannot represent 999)."""
        cast_half_inputs(self.model, self.half_dtype)


def _plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """An unsharded module of `module`'s own class and structure, with fresh (not yet loaded) weights: a
    diffusers model from its config, plus the LoRA adapters of its `peft_config`; a container without weights
    of its own (the T2IModule of families/t2i.py) as a new instance holding the same plain attributes (the
    family's functions, flags) and the plain copies of its children, without FSDP's hooks and state."""
    cls = _original_class(module)
    if hasattr(cls, "from_config"):
        plain = cls.from_config(module.config)
        for adapter, config in (getattr(module, "peft_config", None) or {}).items():  # LoRA: the same adapters
            plain.add_adapter(config, adapter_name=adapter)
        return plain
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]  # not rebuilt here
    if own or not any(True for _ in module.children()):
        raise UserError("validation and export under distributed=fsdp2 need a diffusers model (with "
                        f"from_config) or a container of them; {cls.__name__} is neither")
    plain = cls.__new__(cls)
    torch.nn.Module.__init__(plain)
    plain.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    for name, child in module.named_children():
        setattr(plain, name, _plain_module(child))
    return plain
