"""Schemas of the `distributed` group: how the processes of one run share the work (through accelerate).

`ddp` is plain accelerate (torch DistributedDataParallel; with one process, no wrapper at all). The
`deepspeed_*` options hand model, gradients and optimizer to DeepSpeed's ZeRO engine through accelerate's
DeepSpeedPlugin; difftrain writes the DeepSpeed config from these keys and from `trainer` (micro-batch,
accumulation, `max_grad_norm` -> `gradient_clipping`, `mixed_precision` -> `bf16`/`fp16`), so one YAML
drives both engines. `deepspeed_zero3` is a preset of `deepspeed_zero2` (conf/distributed/deepspeed_zero3.yaml:
`zero_stage: 3`). `fsdp2` is torch's `fully_shard` through accelerate's FSDP plugin (version 2), one unit per
repeated block of the denoiser (engine/strategy_fsdp.py). Pure Python: no torch, accelerate or deepspeed import here.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftrain.config.fields import opt

OFFLOAD = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class DDPConfig:
    name: str = "ddp"
    backend: str | None = opt(None, "process-group backend; null = accelerate's choice (nccl on GPUs, gloo on CPU)",
                              choices=("nccl", "gloo", "mpi"))
    timeout_s: int = opt(1800, "seconds a collective may wait for the other processes", ge=1)
    find_unused_parameters: bool = opt(False, "DDP: allow parameters that receive no gradient (slower)")


@dataclass(frozen=True)
class DeepSpeedConfig:
    name: str = "deepspeed_zero2"
    zero_stage: int = opt(2, "ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also the parameters "
                             "(distributed=deepspeed_zero3)", choices=(1, 2, 3))
    offload_optimizer: str = opt("none", "where optimizer state lives (ZeRO-Offload)", choices=OFFLOAD)
    offload_param: str = opt("none", "where parameters live between uses (ZeRO-3 only)", choices=OFFLOAD)
    nvme_path: str | None = opt(None, "folder on a fast local disk for nvme offload")
    cpu_optimizer: bool = opt(True, "with offload_optimizer: DeepSpeedCPUAdam (a C++ build) instead of the "
                                    "configured torch optimizer")
    overlap_comm: bool = opt(True, "overlap gradient reduction with the backward pass")
    contiguous_gradients: bool = opt(True, "copy gradients into one buffer as they are produced")
    reduce_bucket_size: int = opt(500_000_000, "elements reduced at a time", ge=1)
    allgather_bucket_size: int = opt(500_000_000, "ZeRO-1/2: elements all-gathered at a time", ge=1)
    stage3_prefetch_bucket_size: int = opt(50_000_000, "ZeRO-3: elements prefetched ahead of use", ge=0)
    stage3_param_persistence_threshold: int = opt(100_000, "ZeRO-3: parameters with fewer elements stay whole "
                                                           "on every rank", ge=0)
    timeout_s: int = opt(1800, "seconds a collective may wait for the other processes", ge=1)


@dataclass(frozen=True)
class FSDP2Config:
    name: str = "fsdp2"
    cpu_offload: bool = opt(False, "keep the parameter, gradient and optimizer shards in CPU memory between uses "
                                   "(FSDP2 CPUOffloadPolicy; the optimizer steps on the CPU)")
    reshard_after_forward: bool = opt(True, "free each block's gathered parameters after its forward and gather "
                                            "them again for the backward (less memory, one more all-gather)")
    timeout_s: int = opt(1800, "seconds a collective may wait for the other processes", ge=1)
