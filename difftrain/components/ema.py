"""Exponential moving average of model weights: a drop-in for `diffusers.training_utils.EMAModel`.

Same constructor, decay schedule, public methods and positional `state_dict()` format as diffusers, with:

* float32 shadows always (a bf16/fp16 shadow never moves with decay 0.9999); live params are cast to fp32;
* the update is `lerp_` (fused `torch._foreach_lerp_` per device/dtype group with `foreach=True`): no
  temporary the size of the model; frozen params (`requires_grad=False`) are copied, like upstream;
* numeric hyper-parameters coerced once (a YAML `min_decay: 0` works and survives `load_state_dict`);
* named parameters (`model.named_parameters()`) and `trainable_only=True` (e.g. LoRA): the EMA covers only
  trainable params and `named_state_dict()` / `load_named_state_dict()` are keyed by parameter name;
* `offload=True`: shadows in one pinned CPU buffer allocated once (see `ema_offload`);
* ZeRO-3 parameters gathered in byte-bounded groups, deepspeed imported lazily (see `ema_gather`);
* `save_pretrained` writes the EMA hyper-parameters to `ema_state.json`, not into the model's config.json;
* `swapped(params)`: store -> copy_to -> yield -> restore, restoring even on exceptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from difftrain.components import ema_gather
from difftrain.components.ema_offload import (
    DEFAULT_OFFLOAD_CHUNK_BYTES,
    OffloadBuffers,
    can_pin,
    sync_devices,
)
from difftrain.components.ema_state import (  # noqa: F401 (re-exported: the state names are ema's API)
    EMA_STATE_FILE,
    EMA_STATE_FORMAT,
    HPARAM_KEYS,
    STATE_KEYS,
    _coerce,
    split_named,
)

#: bytes of fp32 copies made at a time when params are not fp32 on the shadows' device (foreach path)
CAST_CHUNK_BYTES = 64 << 20


class EMAModel:
    """Exponential Moving Average of model weights (fp32 shadows); see the module docstring."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        foreach: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        *,
        trainable_only: bool = False,
        offload: bool = False,
        offload_chunk_bytes: int = DEFAULT_OFFLOAD_CHUNK_BYTES,
        gather_bucket_bytes: int = ema_gather.DEFAULT_GATHER_BUCKET_BYTES,
        **kwargs,
    ):
        if isinstance(parameters, torch.nn.Module):  # upstream's deprecated route, same side effect
            warnings.warn(
                "Passing an nn.Module to EMAModel is deprecated; pass model.parameters() or "
                "model.named_parameters(). use_ema_warmup is forced to True, as in diffusers.",
                FutureWarning,
                stacklevel=2,
            )
            use_ema_warmup = True
        if kwargs.get("max_value") is not None:
            warnings.warn("`max_value` is deprecated; use `decay`.", FutureWarning, stacklevel=2)
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            warnings.warn("`min_value` is deprecated; use `min_decay`.", FutureWarning, stacklevel=2)
            min_decay = kwargs["min_value"]
        unknown = sorted(set(kwargs) - {"max_value", "min_value", "device"})
        if unknown:
            warnings.warn(f"EMAModel ignores unknown arguments {unknown}", stacklevel=2)

        for key, value in zip(HPARAM_KEYS, (decay, min_decay, update_after_step, use_ema_warmup, inv_gamma, power)):
            setattr(self, key, _coerce(key, value))
        self.optimization_step = 0
        self.cur_decay_value: float | None = None  # set in step()
        self.foreach = bool(foreach)
        self.trainable_only = bool(trainable_only)
        self.gather_bucket_bytes = int(gather_bucket_bytes)
        self.model_cls = model_cls
        self.model_config = model_config
        self.temp_stored_params: list[torch.Tensor] | None = None

        names, params = split_named(parameters)
        if self.trainable_only:
            keep = [i for i, p in enumerate(params) if p.requires_grad]
            params = [params[i] for i in keep]
            names = None if names is None else [names[i] for i in keep]
        self.param_names: list[str] | None = names

        shapes = [torch.Size(getattr(p, "ds_shape", p.shape)) for p in params]  # ZeRO-3: full shape
        self._offload: OffloadBuffers | None = None
        if offload:
            self._offload = OffloadBuffers(shapes, offload_chunk_bytes)
            self.shadow_params = list(self._offload.views)
        else:
            self.shadow_params = [torch.empty(s, dtype=torch.float32, device=p.device) for s, p in zip(shapes, params)]
        with torch.no_grad():
            for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
                for i in group:
                    self.shadow_params[i].copy_(params[i].detach())
        sync_devices(params)
        if kwargs.get("device") is not None:
            warnings.warn("`device` is deprecated; use `.to(device)`.", FutureWarning, stacklevel=2)
            self.to(device=kwargs["device"])

    # ------------------------------------------------------------------ schedule
    def get_decay(self, optimization_step: int) -> float:
        """Decay for this step: 0 until `update_after_step`+1, then warmup or (1+k)/(10+k), clamped."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    # ------------------------------------------------------------------ parameters
    @property
    def offload(self) -> bool:
        return self._offload is not None

    def _resolve(self, parameters: Any) -> list[torch.Tensor]:
        """The live tensors matching `shadow_params`, in order."""
        names, params = split_named(parameters)
        n = len(self.shadow_params)
        if names is not None and self.param_names is not None:
            if names == self.param_names:
                return params
            lookup = dict(zip(names, params))
            missing = [k for k in self.param_names if k not in lookup]
            if missing:
                raise KeyError(f"EMAModel: parameters missing from the given module: {missing[:5]}")
            return [lookup[k] for k in self.param_names]
        if len(params) == n:
            return params
        if self.trainable_only:
            params = [p for p in params if p.requires_grad]
            if len(params) == n:
                return params
        raise ValueError(f"EMAModel tracks {n} parameters but was given {len(params)}")

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, parameters: Any) -> None:
        params = self._resolve(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        weight = 1.0 - decay
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
            trainable = [i for i in group if params[i].requires_grad]
            frozen = [i for i in group if not params[i].requires_grad]
            if self._offload is not None:
                self._offload.update(params, trainable, frozen, weight)
                continue
            self._copy_frozen(frozen, params)
            if not self.foreach:
                for i in trainable:
                    s, p = self.shadow_params[i], params[i]
                    if p.dtype != torch.float32 or p.device != s.device:
                        p = p.detach().to(device=s.device, dtype=torch.float32)  # one tensor's temporary
                    s.lerp_(p, weight)
            else:
                self._foreach_lerp(trainable, params, weight)

    def _copy_frozen(self, frozen: list[int], params: list[torch.Tensor]) -> None:
        """Frozen params are copied exactly (upstream behaviour); dtype converts to fp32 in the copy."""
        ss, ps = [self.shadow_params[i] for i in frozen], [params[i].detach() for i in frozen]
        if self.foreach and ss and all(s.device == p.device for s, p in zip(ss, ps)):
            torch._foreach_copy_(ss, ps, non_blocking=True)
        else:
            for s, p in zip(ss, ps):
                s.copy_(p)  # cross-device: blocking, so a host shadow is complete when read

    def _foreach_lerp(self, trainable: list[int], params: list[torch.Tensor], weight: float) -> None:
        groups: dict[tuple, tuple[list, list]] = {}
        for i in trainable:
            s, p = self.shadow_params[i], params[i].detach()
            g = groups.setdefault((s.device, p.device, p.dtype), ([], []))
            g[0].append(s)
            g[1].append(p)
        for (s_dev, p_dev, p_dtype), (ss, ps) in groups.items():
            if s_dev == p_dev and p_dtype == torch.float32:
                torch._foreach_lerp_(ss, ps, weight)  # one fused pass, no temporary
                continue
            start, used = 0, 0  # cast to fp32 a chunk at a time: ~CAST_CHUNK_BYTES of temporaries at most
            for j, s in enumerate(ss):
                used += s.numel() * 4
                if used >= CAST_CHUNK_BYTES or j == len(ss) - 1:
                    chunk = [p.to(device=s_dev, dtype=torch.float32) for p in ps[start : j + 1]]
                    torch._foreach_lerp_(ss[start : j + 1], chunk, weight)
                    start, used = j + 1, 0

    # ------------------------------------------------------------------ swap helpers
    @torch.no_grad()
    def copy_to(self, parameters: Any) -> None:
        """Copy the averaged weights into `parameters` (ZeRO-3: gathered, written with modifier_rank=0)."""
        params = self._resolve(parameters)
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=0):
            for i in group:
                params[i].data.copy_(self.shadow_params[i], non_blocking=True)
        sync_devices(params)  # shadows may be modified on the host right after (offload)

    @torch.no_grad()
    def store(self, parameters: Any, device: str | torch.device | None = "cpu") -> None:
        """Save a copy of `parameters` (on `device`; None keeps each on its own device) for `restore()`."""
        params = self._resolve(parameters)
        stored: list[torch.Tensor | None] = [None] * len(params)
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
            for i in group:
                p = params[i].detach()
                stored[i] = p.to(device=device if device is not None else p.device, copy=True)
        self.temp_stored_params = stored

    @torch.no_grad()
    def restore(self, parameters: Any) -> None:
        """Copy back the parameters saved by `store()` and drop the copy."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = self._resolve(parameters)
        if len(params) != len(self.temp_stored_params):
            raise ValueError(f"restore: {len(self.temp_stored_params)} stored tensors, {len(params)} given")
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=0):
            for i in group:
                params[i].data.copy_(self.temp_stored_params[i], non_blocking=True)
        sync_devices(params)
        self.temp_stored_params = None

    @contextlib.contextmanager
    def swapped(self, parameters: Any) -> Iterator[None]:
        """`with ema.swapped(model.parameters()):` runs the body with EMA weights, then always restores."""
        params = self._resolve(parameters)
        self.store(params)
        try:
            self.copy_to(params)
            yield
        finally:
            self.restore(params)

    # ------------------------------------------------------------------ placement
    def enable_offload(self, chunk_bytes: int = DEFAULT_OFFLOAD_CHUNK_BYTES) -> None:
        """Move the shadows into one CPU buffer (pinned when CUDA is available), allocated once."""
        if self._offload is not None:
            return
        buffers = OffloadBuffers([s.shape for s in self.shadow_params], chunk_bytes)
        for view, s in zip(buffers.views, self.shadow_params):
            view.copy_(s)
        self._offload, self.shadow_params = buffers, list(buffers.views)

    def pin_memory(self) -> None:
        """Pin CPU shadows (no-op without CUDA, and when offloaded: already pinned)."""
        if self._offload is None and can_pin():
            self.shadow_params = [p.pin_memory() if p.device.type == "cpu" else p for p in self.shadow_params]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Move the shadows to `device`. They stay float32: another floating `dtype` is ignored with a
        warning. Moving an offloaded EMA to an accelerator turns offload off."""
        if dtype is not None and dtype != torch.float32:
            warnings.warn(f"EMAModel keeps float32 shadows; ignoring dtype={dtype}", stacklevel=2)
        if device is None:
            return
        device = torch.device(device)
        if self._offload is not None:
            if device.type == "cpu":
                return
            self._offload = None
        self.shadow_params = [p.to(device=device, non_blocking=non_blocking) for p in self.shadow_params]

    # ------------------------------------------------------------------ state
    def hparams(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def state_dict(self) -> dict:
        """diffusers' format (hyper-parameters + positional `shadow_params`, as references), plus
        `param_names` when the EMA is named."""
        state = self.hparams()
        state["shadow_params"] = self.shadow_params
        if self.param_names is not None:
            state["param_names"] = list(self.param_names)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load hyper-parameters (coerced, so int `min_decay` is fine) and copy shadows into the existing
        fp32 buffers (they keep their device). Missing keys keep their current values."""
        values = {k: _coerce(k, state_dict[k]) for k in STATE_KEYS if k in state_dict}
        shadows = state_dict.get("shadow_params")
        if shadows is not None:
            if not isinstance(shadows, (list, tuple)):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(t, torch.Tensor) for t in shadows):
                raise ValueError("shadow_params must all be Tensors")
            names = state_dict.get("param_names")
            if names is not None and self.param_names is not None:
                self.load_named_state_dict(dict(zip(names, shadows)))
            else:
                self._copy_into_shadows(list(shadows))
        for k, v in values.items():
            setattr(self, k, v)

    def _copy_into_shadows(self, tensors: list[torch.Tensor], names: list[str] | None = None) -> None:
        if len(tensors) != len(self.shadow_params):
            raise ValueError(f"expected {len(self.shadow_params)} shadow tensors, got {len(tensors)}")
        for i, (s, t) in enumerate(zip(self.shadow_params, tensors)):
            if s.shape != t.shape:
                label = names[i] if names else i
                raise ValueError(f"shadow {label}: shape {tuple(t.shape)} != {tuple(s.shape)}")
        with torch.no_grad():
            for s, t in zip(self.shadow_params, tensors):
                s.copy_(t)

    def named_state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 shadow} (references). Needs an EMA built from named parameters."""
        if self.param_names is None:
            raise ValueError("named_state_dict() needs EMAModel(model.named_parameters(), ...)")
        return dict(zip(self.param_names, self.shadow_params))

    def load_named_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True):
        """Copy shadows by name. Returns (missing, unexpected) names; with `strict` either raises KeyError."""
        if self.param_names is None:
            raise ValueError("load_named_state_dict() needs EMAModel(model.named_parameters(), ...)")
        missing = [k for k in self.param_names if k not in state]
        unexpected = sorted(set(state) - set(self.param_names))
        if strict and (missing or unexpected):
            raise KeyError(f"EMA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        full = [state.get(k, s) for k, s in zip(self.param_names, self.shadow_params)]
        self._copy_into_shadows(full, self.param_names)
        return missing, unexpected

    # ------------------------------------------------------------------ serialization
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save a `model_cls` folder holding the EMA weights (loads with `model_cls.from_pretrained`),
        plus the EMA state in `ema_state.json`; the model's config.json gets no EMA keys."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        if self.param_names is not None:
            model_names = [n for n, _ in model.named_parameters()]
            if set(model_names) != set(self.param_names):
                raise ValueError(
                    f"EMA covers {len(self.param_names)} of the model's {len(model_names)} parameters; "
                    "save_pretrained needs all of them (use named_state_dict() for a partial EMA)")
            self.copy_to(model)
        else:
            self.copy_to(model.parameters())
        model.save_pretrained(path)
        state = {"format": EMA_STATE_FORMAT, **self.hparams(), "named": self.param_names is not None}
        with open(os.path.join(path, EMA_STATE_FILE), "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_cls, foreach: bool = False, **kwargs) -> EMAModel:
        """Load a folder written by `save_pretrained` (or by diffusers' EMAModel, whose EMA keys live in
        config.json). Extra kwargs (e.g. `offload=True`) go to the constructor."""
        model = model_cls.from_pretrained(path)
        state_file = os.path.join(path, EMA_STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as f:
                state = json.load(f)
        else:  # legacy diffusers folder: EMA keys were registered into config.json
            state = {k: v for k, v in model_cls.load_config(path).items() if k in STATE_KEYS}
        named = bool(state.get("named", False))
        ema = cls(
            model.named_parameters() if named else model.parameters(),
            model_cls=model_cls,
            model_config=model.config,
            foreach=foreach,
            **{k: state[k] for k in HPARAM_KEYS if k in state},
            **kwargs,
        )
        ema.load_state_dict({k: state[k] for k in STATE_KEYS if k in state})
        return ema
