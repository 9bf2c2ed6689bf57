"""Speed settings of the `trainer` section applied to the trained module: `compile`, `channels_last`, `allow_tf32`.

`trainer.compile`:

* `none`: eager.
* `full`: `module.compile()` on the whole trained module (the denoiser, plus the text encoders when LoRA trains
  them).
* `regional`: `compile()` on every repeated block instead (diffusers' `compile_repeated_blocks` idea): the UNets'
  `ResnetBlock2D` and `Transformer2DModel` blocks (SD 1.x/2.x, SDXL, the digits UNet's resnets and attention),
  SD3's `JointTransformerBlock`s, FLUX.1's double and single blocks, and whatever a diffusers model lists in its
  `_repeated_blocks`. Each block class compiles once and is reused for every instance with the same shapes, so
  compile time is a fraction of `full` for about the same step time.

Both compile *in place* (`nn.Module.compile`, not `torch.compile(module)`): no `OptimizedModule` wrapper, so state
dict keys stay the plain ones (no `_orig_mod.` prefix) in checkpoints, EMA and exports, and a checkpoint of a
compiled run loads into an eager one. Compile is applied after LoRA adapters, quantisation and gradient
checkpointing are in place (tests/engine/test_compile.py).

Recompilation across aspect-ratio buckets is bounded by the number of distinct shapes: graphs are compiled with
static shapes (`dynamic=False`), one per bucket size (and, for `regional`, per resolution level of a UNet), and
reused whenever that size comes back. Static graphs because a UNet's repeated blocks run at several sizes in one
forward, which makes torch's automatic dynamic shapes mark them dynamic at once, and inductor (torch 2.14) then
fails on the cross-attention blocks ("cannot determine truth value of Relational"). The recompile limit
(`torch._dynamo.config.recompile_limit`, `cache_size_limit` on older torch) is raised to at least
`RECOMPILE_LIMIT` so that buckets x levels x train/eval graphs fit; past it torch runs that block eager (with
a warning), never wrong. Few buckets (`data.buckets`) keep compile time short.
"""

from __future__ import annotations

import torch

REGION_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "JointTransformerBlock", "FluxTransformerBlock",
                  "FluxSingleTransformerBlock", "BasicTransformerBlock", "Attention")
RECOMPILE_LIMIT = 128
DEFAULT_BACKEND = "inductor"  # tests may swap in "aot_eager" (same graphs, no C++ compile)


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))
            return


def region_class_names(module: torch.nn.Module) -> set[str]:
    """The block classes `regional` compiles inside `module`: REGION_CLASSES plus every submodule's
    `_repeated_blocks` (diffusers' own list)."""
    names = set(REGION_CLASSES)
    for sub in module.modules():
        names.update(getattr(type(sub), "_repeated_blocks", None) or ())
    return names


def regions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost submodules of a region class (a compiled Transformer2DModel covers its inner blocks)."""
    names = region_class_names(module)
    found: list[torch.nn.Module] = []

    def walk(node: torch.nn.Module) -> None:
        for child in node.children():
            if type(child).__name__ in names:
                found.append(child)
            else:
                walk(child)

    walk(module)
    return found


def compile_module(module: torch.nn.Module, mode: str, backend: str | None = None, **options) -> int:
    """Compile `module` in place; returns how many modules were compiled (0 for `none`)."""
    if mode == "none":
        return 0
    backend = backend or DEFAULT_BACKEND
    options.setdefault("dynamic", False)
    raise_recompile_limit()
    if mode == "full":
        module.compile(backend=backend, **options)
        return 1
    if mode != "regional":
        raise ValueError(f"unknown compile mode {mode!r}")
    targets = regions(module)
    if not targets:  # a model without known blocks: compile its direct children instead
        targets = [child for child in module.children() if any(True for _ in child.parameters())]
    for block in targets:
        block.compile(backend=backend, **options)
    return len(targets)


def trained_denoiser(module: torch.nn.Module) -> torch.nn.Module:
    """The denoiser inside a family's trained module (families/t2i.py T2IModule), or the module itself."""
    return getattr(module, "denoiser", module)


def wants_channels_last(setting: bool | None, device: torch.device) -> bool:
    """trainer.channels_last: null = on CUDA only (on CPU, channels_last convolutions are often slower)."""
    return (device.type == "cuda") if setting is None else bool(setting)


def apply_channels_last(module: torch.nn.Module) -> bool:
    """UNets only: 4-d conv weights to channels_last; activations follow the weights' format. Transformers
    (SD3, FLUX.1) patchify once and have no 4-d convolutions worth converting. True when converted."""
    denoiser = trained_denoiser(module)
    if "UNet" not in type(denoiser).__name__:
        return False
    denoiser.to(memory_format=torch.channels_last)
    return True


def apply_tf32(allow: bool, deterministic: bool) -> bool:
    """TF32 matmuls and cuDNN convolutions (Ampere and newer GPUs; no effect elsewhere), never in deterministic
    runs. Returns the setting in force."""
    on = bool(allow) and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def apply_speed_options(module: torch.nn.Module, trainer: dict, device: torch.device) -> dict:
    """The `trainer` speed keys on the module the engine trains (engine/setup.py, after LoRA, quantisation and
    gradient checkpointing); returns what was done (for the log)."""
    done = {"tf32": apply_tf32(trainer.get("allow_tf32", True), trainer.get("deterministic", False))}
    done["channels_last"] = (wants_channels_last(trainer.get("channels_last"), device)
                             and apply_channels_last(module))
    mode = trainer.get("compile", "none")
    target = module if mode == "full" else trained_denoiser(module)
    done["compiled"] = compile_module(target, mode)
    return done
