"""`model.quantize_base`: the frozen denoiser under LoRA stored quantised (QLoRA), the adapters in fp32.

* `nf4`: bitsandbytes 4-bit NormalFloat (`bnb.nn.Linear4bit`, compute in the weight dtype), as diffusers' FLUX
  QLoRA example does. Needs a CUDA device: bitsandbytes' CPU 4-bit backend is not what peft's QLoRA layers
  are tested with, so difftrain refuses it there and names what works.
* `int8`: torchao weight-only int8 (`Int8WeightOnlyConfig`): one int8 weight and a per-channel scale per Linear;
  runs on CPU and GPU.
* `fp8`: torchao weight-only float8 e4m3 (`Float8WeightOnlyConfig`); needs a GPU with compute capability >= 8.9
  (Ada, Hopper, Blackwell).

Every `nn.Linear` of the denoiser is quantised except the modules the model keeps in fp32
(`_keep_in_fp32_modules`) and, for fp8, layers whose sides are not multiples of 16. The order is
freeze -> cast the base -> quantise -> add adapters (peft wraps the quantised layers: `Linear4bit`,
`TorchaoLoraLinear`) -> adapters to fp32. Only adapter weights are trained, checkpointed and exported, so the
LoRA files have the same keys as an unquantised run's (tests/t2i/test_quantize.py).

Autocast (trainer.mixed_precision=bf16): torchao runs `F.linear` of its weight tensors in `__torch_function__`,
above autocast, and returns the activation's dtype, so a quantised layer fed fp32 (the noisy latents and the
UNet's time embedding are fp32) answered fp32 where an autocast `nn.Linear` answers bf16; a UNet then added
that fp32 time embedding to its bf16 conv output and handed fp32 activations to a bf16 GroupNorm, which CPU
autocast leaves alone ("mixed dtype (CPU)"). Each torchao-quantised layer therefore casts its floating input
to the autocast dtype first (`_autocast_input`), as autocast does for an unquantised `nn.Linear`.
"""

from __future__ import annotations

import torch

from difftrain.errors import UserError

FP8_MIN_CAPABILITY = (8, 9)


def device_problem(kind: str, device: torch.device) -> str | None:
    """Why `kind` cannot run on `device` (a sentence naming what would work), or None."""
    if kind == "nf4" and device.type != "cuda":
        return (f"model.quantize_base=nf4 (bitsandbytes 4-bit) needs a CUDA GPU, but this run is on {device.type}; "
                "use model.quantize_base=int8 (torchao, runs on CPU) or none, or run on a CUDA device")
    if kind == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or tuple(capability) < FP8_MIN_CAPABILITY:
            where = f"a GPU of compute capability {capability[0]}.{capability[1]}" if capability else device.type
            return (f"model.quantize_base=fp8 needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer), "
                    f"but this run is on {where}; use model.quantize_base=int8 (torchao, CPU or any GPU), nf4 "
                    "(bitsandbytes, CUDA) or none")
    return None


def _require(module: str, kind: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"model.quantize_base={kind} needs {package}: pip install 'difftrain[quant]' "
                        f"(or pip install {package}), or set model.quantize_base=none") from None


def quantizable(model: torch.nn.Module, kind: str):
    """filter(module, name): the nn.Linear layers that `kind` quantises."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def accept(module: torch.nn.Module, name: str) -> bool:
        if type(module) is not torch.nn.Linear or any(part in keep for part in name.split(".")):
            return False
        if kind == "fp8" and (module.in_features % 16 or module.out_features % 16):
            return False
        return True

    return accept


def _quantize_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    bnb = _require("bitsandbytes", "nf4")
    accept = quantizable(model, "nf4")
    targets = [(name, m) for name, m in model.named_modules() if accept(m, name)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(linear.weight.data.detach().cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.detach().cpu(), requires_grad=False)
        setattr(parent, child, q)
    model.to(device)  # Params4bit quantise when they reach the CUDA device
    return len(targets)


def _quantize_torchao(model: torch.nn.Module, kind: str, device: torch.device) -> int:
    _require("torchao", kind)
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig as Config
    else:
        from torchao.quantization import Float8WeightOnlyConfig as Config
    accept = quantizable(model, kind)
    model.to(device)
    quantize_(model, Config(), filter_fn=accept)
    quantized = [m for m in model.modules() if _torchao_weight(m)]
    for linear in quantized:  # peft keeps these modules as its layers' base_layer: the hook stays with them
        linear.register_forward_pre_hook(_autocast_input)
    return len(quantized)


def _torchao_weight(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao")


def _autocast_input(module: torch.nn.Module, args: tuple):
    """Forward pre-hook of a torchao-quantised Linear: under autocast, its input in the autocast dtype (what
    autocast does for an nn.Linear; torchao's linear runs above autocast and keeps the input's dtype)."""
    x = args[0] if args else None
    if not torch.is_tensor(x) or not x.is_floating_point():
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if x.dtype == dtype else (x.to(dtype), *args[1:])


def quantize_frozen_base(model: torch.nn.Module, kind: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Quantise the frozen `model` in place on `device`; returns the number of quantised Linear layers.
    Raises UserError (exit 2) where `kind` cannot run here."""
    if kind == "none":
        return 0
    problem = device_problem(kind, torch.device(device))
    if problem:
        raise UserError(problem)
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("quantize the frozen base before adding trainable adapters")
    count = _quantize_nf4(model, device, compute_dtype) if kind == "nf4" else _quantize_torchao(model, kind, device)
    if count == 0:
        raise UserError(f"model.quantize_base={kind}: the {type(model).__name__} has no Linear layer to quantise; "
                        "set model.quantize_base=none")
    return count


def quantized_layers(model: torch.nn.Module) -> int:
    """How many weights of `model` are stored quantised (torchao tensor subclasses or bitsandbytes Params4bit)."""
    return sum(1 for p in model.parameters()
               if type(p).__name__ == "Params4bit" or type(p).__module__.startswith("torchao"))
