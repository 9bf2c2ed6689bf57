"""Config rules of `distributed=fsdp2`: the combinations that cannot run (or are not supported yet) under FSDP2.

One function per rule; the first docstring line is its line in docs/configuration.md (listed in rules.RULES).
Pure Python, no torch.
"""

from __future__ import annotations

from difftrain.config.rule_helpers import chosen_is, node_of
from difftrain.config.schema_distributed import FSDP2Config


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
