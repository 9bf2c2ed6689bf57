"""A tiny typed-field vocabulary for config schemas (dataclasses + range/choice metadata)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, ge=None, gt=None, le=None, lt=None,
        choices: tuple | None = None, factory=None):
    """A schema field: default, one-line doc, numeric bounds and allowed values."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for a YAML value against a type annotation. Ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp,) = typing.get_args(tp)
        items = [coerce(v, item_tp) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return math.isfinite(value) or math.isinf(value), float(value)
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def check_bounds(value: Any, meta: dict) -> str | None:
    """A message if value breaks the field's choices or numeric bounds, else None."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            return "must be a number, not NaN"
        for key, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            bound = meta.get(key)
            if bound is not None and not test(value, bound):
                return f"must be {word} {bound:.6g}"
    return None
