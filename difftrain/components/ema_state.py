"""The values of an EMA's state: names, the file it is saved in, and the checks of each value (shared by
`EMAModel`'s constructor, `load_state_dict` and `from_pretrained`); `split_named` reads the forms in which
parameters are passed (plain, named pairs, a Mapping, a module)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

EMA_STATE_FILE = "ema_state.json"
EMA_STATE_FORMAT = "difftrain.ema/1"
HPARAM_KEYS = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def _coerce(name: str, value: Any) -> float | int | bool:
    """Validate one state value; ints become floats where diffusers wants a float (YAML `min_decay: 0`).
    Errors are ValueError("Invalid <name>...") like upstream's checks."""
    kind, lo, hi = _SPEC[name]
    number = isinstance(value, (numbers.Real, torch.Tensor)) and not isinstance(value, bool)
    if kind is bool and (isinstance(value, bool) or (number and float(value) in (0.0, 1.0))):
        return bool(value)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number and not math.isnan(float(value)) and lo <= float(value) <= hi:
        return float(value)
    raise ValueError(f"Invalid {name}: {value!r}")


_INF = float("inf")
_SPEC = {  # name: (type, low, high)
    "decay": (float, 0.0, 1.0), "min_decay": (float, 0.0, 1.0), "optimization_step": (int, 0, 0),
    "update_after_step": (int, 0, 0), "use_ema_warmup": (bool, 0, 0), "inv_gamma": (float, 1e-12, _INF),
    "power": (float, 0.0, _INF),
}


def split_named(parameters: Any) -> tuple[list[str] | None, list[torch.Tensor]]:
    """(names or None, params) from params, (name, param) pairs, a Mapping or an nn.Module."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
    elif isinstance(parameters, Mapping):
        parameters = parameters.items()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    items = list(parameters)
    if items and isinstance(items[0], tuple):
        names = [n for n, _ in items]
        if not all(isinstance(n, str) for n in names):
            raise TypeError("named parameters must be (str, Tensor) pairs")
        return names, [p for _, p in items]
    return None, items
