"""One run, many processes: the Accelerator of the `distributed` group (DDP, DeepSpeed or FSDP2).

Launchers (`accelerate launch`, `torchrun`, `deepspeed`, SLURM `srun` + torchrun) start N copies of
`difftrain train`; each builds the same Accelerator here. The engines are accelerate's: torch DDP
(`distributed=ddp`) or DeepSpeed ZeRO through `DeepSpeedPlugin` (`distributed=deepspeed_zero2|3`), with
the DeepSpeed config written from the YAML, or torch FSDP2 through accelerate's FSDP plugin
(`distributed=fsdp2`, engine/strategy_fsdp.py). How each engine saves, loads and gathers weights is in
engine/strategies.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

from difftrain.errors import UserError


def launched_world_size() -> int:
    """Processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator() -> bool:
    import torch

    api = getattr(torch, "accelerator", None)
    return bool(api.is_available()) if api is not None else torch.cuda.is_available()


def _handlers(backend: str | None, timeout_s: int) -> list:
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=timeout_s))]


def ddp_accelerator_kwargs(options, trainer: dict) -> dict:
    """Accelerator kwargs for `distributed=ddp` (`options`: config/schema_distributed.py DDPConfig).

    accelerate picks gloo/MULTI_CPU only when told the run is on CPU: without that, `torchrun` on a machine
    without accelerators would start N independent single-process runs that all believe they are rank 0.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = _handlers(options.backend, options.timeout_s)
    if options.find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    cpu = bool(trainer["cpu"]) or (launched_world_size() > 1 and not has_accelerator())
    return {"kwargs_handlers": handlers, "cpu": cpu}


def deepspeed_config(opts: dict, trainer: dict, world_size: int) -> dict:
    """The DeepSpeed JSON config of one run: ZeRO keys from `distributed`, the rest from `trainer`."""
    stage = opts["zero_stage"]
    zero: dict = {"stage": stage, "overlap_comm": opts["overlap_comm"],
                  "contiguous_gradients": opts["contiguous_gradients"],
                  "reduce_bucket_size": opts["reduce_bucket_size"]}
    if stage < 3:
        zero["allgather_bucket_size"] = opts["allgather_bucket_size"]
    else:
        zero.update(stage3_prefetch_bucket_size=opts["stage3_prefetch_bucket_size"],
                    stage3_param_persistence_threshold=opts["stage3_param_persistence_threshold"],
                    stage3_gather_16bit_weights_on_model_save=True)  # full weights for export/validation
    for key in ("offload_optimizer", "offload_param"):
        if opts[key] != "none":
            zero[key] = {"device": opts[key], "pin_memory": has_accelerator()}
            if opts[key] == "nvme":
                zero[key]["nvme_path"] = opts["nvme_path"]
    batch, accum, mp = trainer["batch_size"], trainer["grad_accum"], trainer["mixed_precision"]
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": batch * accum * world_size,
        "gradient_clipping": float(trainer["max_grad_norm"] or 0.0),  # DeepSpeed clips; 0 = off
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": opts["cpu_optimizer"],
        "wall_clock_breakdown": False,
    }


def _single_process_env() -> None:
    """DeepSpeed always runs in a process group: give a launcher-less run a group of one."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _skip_cpu_inference_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op when the process group starts (over a
    minute on 2 cores). Only `inference_all_reduce` uses it, never training; mark it unavailable so the
    build is skipped and the gloo collectives are used."""
    with contextlib.suppress(ImportError, AttributeError, TypeError):  # another layout: the op is simply built
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_accelerator_kwargs(options, trainer: dict) -> dict:
    """Accelerator kwargs for `distributed=deepspeed_*`: a DeepSpeedPlugin with the generated config
    (`options`: config/schema_distributed.py DeepSpeedConfig)."""
    import dataclasses

    from accelerate.utils import DeepSpeedPlugin

    opts, timeout_s = dataclasses.asdict(options), options.timeout_s

    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        raise UserError("DeepSpeed does not run with `accelerate launch --cpu`: drop --cpu (on a machine "
                        "without GPUs DeepSpeed picks its CPU accelerator itself)")
    _single_process_env()
    on_cpu = not has_accelerator()
    if on_cpu:
        _skip_cpu_inference_comm_op()
    config = deepspeed_config(opts, trainer, launched_world_size())
    plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
    # accelerate only knows nccl & co. for DeepSpeed; on CPU the process group must be told to use gloo
    return {"deepspeed_plugin": plugin, "kwargs_handlers": _handlers("gloo" if on_cpu else None, timeout_s),
            "cpu": False}


def make_accelerator(cfg: dict):
    """The run's Accelerator; fails clearly when the processes did not join one process group."""
    from accelerate import Accelerator

    from difftrain import registry

    t, name = cfg["trainer"], cfg["distributed"]["name"]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not name.startswith("deepspeed"):
        raise UserError("the launcher asks for DeepSpeed (accelerate launch --use_deepspeed) but the config has "
                        f"distributed={name}; choose distributed=deepspeed_zero2 or deepspeed_zero3 instead "
                        "(difftrain writes the DeepSpeed config from its YAML) and launch without --use_deepspeed")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and name != "fsdp2":
        raise UserError("the launcher asks for FSDP (accelerate launch --use_fsdp) but the config has "
                        f"distributed={name}; choose distributed=fsdp2 instead (difftrain sets up FSDP from its "
                        "YAML) and launch without --use_fsdp")
    kwargs = registry.build("distributed", cfg["distributed"], trainer=t)
    after_init = kwargs.pop("after_init", None)  # fsdp2: accelerate's state finished (engine/strategy_fsdp.py)
    accelerator = Accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"],
                              step_scheduler_with_optimizer=False, **kwargs)
    if after_init is not None:
        after_init(accelerator)
    if accelerator.num_processes != launched_world_size():
        raise UserError(f"the launcher started {launched_world_size()} processes but accelerate joined "
                        f"{accelerator.num_processes}; on a machine without GPUs use `accelerate launch --cpu` "
                        "or set trainer.cpu=true")
    return accelerator


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; sequential jobs of a sweep start from a clean slate."""
    import sys

    if "accelerate" not in sys.modules or launched_world_size() > 1:
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
