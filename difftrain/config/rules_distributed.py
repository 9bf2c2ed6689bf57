"""Config rules of `distributed=deepspeed_*` and `distributed=fsdp2`: consistent ZeRO options, and the
combinations that cannot run (or are not supported yet) under DeepSpeed or FSDP2.

One function per rule; the first docstring line is its line in docs/configuration.md (listed in rules.RULES).
Pure Python, no torch.
"""

from __future__ import annotations

from difftrain.config.rule_helpers import changed_keys, chosen_is, node_of
from difftrain.config.schema_distributed import DeepSpeedConfig, FSDP2Config


def _fsdp2(cfg: dict) -> bool:
    return chosen_is(cfg, "distributed", FSDP2Config)


def fsdp2_not_with_forced_cpu(cfg: dict) -> list[str]:
    """FSDP2 cannot be combined with `trainer.cpu=true`."""
    if _fsdp2(cfg) and node_of(cfg, "trainer").get("cpu"):
        return ["trainer.cpu=true cannot be combined with distributed=fsdp2 (torch shards over the machine's "
                "accelerator when it has one); on a machine without GPUs leave trainer.cpu=false: FSDP2 then "
                "runs on the CPU with gloo by itself"]
    return []


def fsdp2_not_with_adamw8bit(cfg: dict) -> list[str]:
    """FSDP2 cannot be combined with `optimizer=adamw8bit`."""
    if _fsdp2(cfg) and node_of(cfg, "optimizer").get("name") == "adamw8bit":
        return ["optimizer=adamw8bit cannot step FSDP2's sharded parameters (DTensors): use optimizer=adamw "
                "(its state is sharded with the parameters already)"]
    return []


def fsdp2_not_with_compile(cfg: dict) -> list[str]:
    """FSDP2 is not yet combined with `trainer.compile` (use `none`)."""
    mode = node_of(cfg, "trainer").get("compile", "none")
    if _fsdp2(cfg) and mode not in (None, "none"):
        return [f"trainer.compile={mode} is not supported with distributed=fsdp2 yet (compiling in place before "
                "fully_shard is untested); use trainer.compile=none, or distributed=ddp to compile"]
    return []


def fsdp2_not_with_quantized_base(cfg: dict) -> list[str]:
    """FSDP2 does not shard a quantised base (`model.quantize_base` must be `none`)."""
    quantize = node_of(cfg, "model").get("quantize_base", "none")
    if _fsdp2(cfg) and quantize not in (None, "none"):
        return [f"model.quantize_base={quantize} cannot be sharded by distributed=fsdp2 (quantised weights are "
                "not DTensors); use model.quantize_base=none, or distributed=ddp for QLoRA"]
    return []


def fsdp2_trains_only_the_denoiser(cfg: dict) -> list[str]:
    """FSDP2 shards the denoiser only: `lora.train_text_encoder` must be false."""
    if _fsdp2(cfg) and node_of(cfg, "lora").get("train_text_encoder"):
        return ["lora.train_text_encoder=true trains weights outside the denoiser, which distributed=fsdp2 does "
                "not shard; set lora.train_text_encoder=false, or use distributed=ddp"]
    return []


def fsdp2_not_with_posthoc_ema(cfg: dict) -> list[str]:
    """FSDP2 is not yet combined with `ema=posthoc` (use `ema=ema` or `none`)."""
    if _fsdp2(cfg) and node_of(cfg, "ema").get("name") == "posthoc":
        return ["ema=posthoc is not supported with distributed=fsdp2 yet; use ema=ema (gathered from the shards "
                "in bounded groups) or ema=none"]
    return []


# ---- DeepSpeed ----------------------------------------------------------------------------------
def deepspeed_option_matches_zero_stage(cfg: dict) -> list[str]:
    """`distributed=deepspeed_zero3` is ZeRO-3 and `deepspeed_zero2` ZeRO-1/2: `distributed.zero_stage` agrees."""
    ds = node_of(cfg, "distributed")
    name, stage = ds.get("name"), ds.get("zero_stage")
    if name == "deepspeed_zero3" and stage != 3:
        return [f"distributed=deepspeed_zero3 is the ZeRO-3 preset, but distributed.zero_stage={stage}: use "
                f"distributed=deepspeed_zero2 distributed.zero_stage={stage}"]
    if name == "deepspeed_zero2" and stage == 3:
        return ["distributed=deepspeed_zero2 with distributed.zero_stage=3: use distributed=deepspeed_zero3, the "
                "ZeRO-3 preset"]
    return []


def offload_param_needs_zero3(cfg: dict) -> list[str]:
    """`distributed.offload_param` needs ZeRO-3."""
    if not chosen_is(cfg, "distributed", DeepSpeedConfig):
        return []
    ds = cfg["distributed"]
    if ds["offload_param"] != "none" and ds["zero_stage"] != 3:
        return [f"distributed.offload_param={ds['offload_param']} needs ZeRO-3 "
                f"(distributed.zero_stage={ds['zero_stage']}); use distributed=deepspeed_zero3"]
    return []


def nvme_offload_needs_a_path(cfg: dict) -> list[str]:
    """nvme offload needs `distributed.nvme_path`."""
    if not chosen_is(cfg, "distributed", DeepSpeedConfig):
        return []
    ds = cfg["distributed"]
    if "nvme" in (ds["offload_param"], ds["offload_optimizer"]) and not ds["nvme_path"]:
        return ["nvme offload needs distributed.nvme_path=/path/on/a/local/nvme/disk"]
    return []


def zero_stage_keys_apply(cfg: dict) -> list[str]:
    """`distributed.stage3_*` keys need ZeRO-3 and `distributed.allgather_bucket_size` ZeRO-1/2 (else they stay at their defaults)."""
    if not chosen_is(cfg, "distributed", DeepSpeedConfig):
        return []
    stage = cfg["distributed"]["zero_stage"]
    unused = (("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold") if stage != 3
              else ("allgather_bucket_size",))
    needs = "ZeRO-3 (distributed=deepspeed_zero3)" if stage != 3 else "ZeRO-1/2 (distributed=deepspeed_zero2)"
    return [f"distributed.{key}={value} has no effect with distributed.zero_stage={stage}: it applies to {needs}; "
            f"remove it" for key, value in changed_keys(cfg, "distributed", unused)]


def deepspeed_not_with_forced_cpu(cfg: dict) -> list[str]:
    """DeepSpeed cannot be combined with `trainer.cpu=true`."""
    if chosen_is(cfg, "distributed", DeepSpeedConfig) and node_of(cfg, "trainer").get("cpu"):
        return ["trainer.cpu=true cannot be combined with DeepSpeed (accelerate runs DeepSpeed on the accelerator); "
                "on a machine without GPUs leave trainer.cpu=false: DeepSpeed picks its CPU accelerator itself"]
    return []


def deepspeed_not_with_adamw8bit(cfg: dict) -> list[str]:
    """DeepSpeed cannot be combined with `optimizer=adamw8bit`."""
    if chosen_is(cfg, "distributed", DeepSpeedConfig) and node_of(cfg, "optimizer").get("name") == "adamw8bit":
        return ["optimizer=adamw8bit is not supported under DeepSpeed; use optimizer=adamw"]
    return []
