"""Validate a composed, resolved config (plain dict) against the schemas, reporting every error.

Runs before torch is imported: a typo, a wrong type, an out-of-range value or a meaningless
combination is reported in well under a second, all at once, and nothing is built or written.
Two passes: every key against its schema field (type, bounds, choices; defaults filled), then every rule of
difftrain/config/rules.py (`RULES`) on the checked config. A plugin's schema may also define
`check(self, cfg) -> list[str]` for rules of its own option; it runs after `RULES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from difftrain import registry
from difftrain.config import schema
from difftrain.config.fields import check_bounds, coerce, describe_type
from difftrain.config.rules import RULES


class ConfigError(ValueError):
    """One or more config problems; `errors` lists them (each names the key and the fix)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_dataclass(prefix: str, node: Any, cls: type, errors: list[str]) -> dict | None:
    """Check `node` against dataclass `cls`; returns the node with defaults filled and values coerced, or None
    when a value is wrong (so that the rules only ever see complete, well-typed nodes). An unknown key is
    reported and left out; the rest of the node still counts as checked."""
    if not isinstance(node, dict):
        errors.append(f"{prefix} must be a mapping, got {type(node).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    wrong = False
    for key, value in node.items():
        if key not in fields:
            allowed = sorted(fields)
            errors.append(f"{prefix}.{key} is not a key of {prefix}{_suggest(key, allowed)}; "
                          f"allowed keys: {', '.join(allowed)}")
            continue
        ok, coerced = coerce(value, hints[key])
        if not ok:
            errors.append(f"{prefix}.{key} must be {describe_type(hints[key])}, got {value!r}")
            wrong = True
            continue
        problem = check_bounds(coerced, fields[key].metadata) if coerced is not None else None
        if problem:
            errors.append(f"{prefix}.{key}={coerced!r} {problem}")
            wrong = True
            continue
        out[key] = coerced
    for name, f in fields.items():  # defaults for keys the YAML left out
        if name not in node:
            if f.default is not dataclasses.MISSING:
                out[name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[name] = f.default_factory()
    return None if wrong else out


def validate(cfg: dict) -> dict:
    """Return the checked config (coerced, defaults filled) or raise ConfigError listing every problem."""
    errors: list[str] = []
    out: dict[str, Any] = {}
    known = set(schema.TOP_LEVEL_SCALARS) | set(schema.SECTIONS) | set(schema.GROUPS)
    for key in cfg:
        if key not in known:
            errors.append(f"'{key}' is not a top-level config key{_suggest(key, sorted(known))}; "
                          f"allowed: {', '.join(sorted(known))}")
    for key, (tp, f) in schema.TOP_LEVEL_SCALARS.items():
        value = cfg.get(key, f.default)
        ok, coerced = coerce(value, tp)
        problem = None if not ok or coerced is None else check_bounds(coerced, f.metadata)
        if not ok:
            errors.append(f"{key} must be {describe_type(tp)}, got {value!r}")
        elif problem:
            errors.append(f"{key}={coerced!r} {problem}")
        else:
            out[key] = coerced
    for key, cls in schema.SECTIONS.items():
        checked = _check_dataclass(key, cfg.get(key, {}), cls, errors)
        if checked is not None:
            out[key] = checked
    options: dict[str, Any] = {}
    for group in schema.GROUPS:
        node = cfg.get(group)
        if not isinstance(node, dict) or "name" not in node:
            errors.append(f"{group} must be chosen: {group}=<one of {', '.join(registry.names(group))}>")
            continue
        try:
            entry = registry.get(group, str(node["name"]))
        except registry.UnknownComponentError as exc:
            errors.append(f"{exc}; choose one with {group}=<name>")
            continue
        if entry.schema is None:
            out[group] = dict(node)
            continue
        checked = _check_dataclass(group, node, entry.schema, errors)
        if checked is not None:
            out[group] = checked
            options[group] = entry.schema(**checked)
    for rule in RULES:  # the rules that span keys, with the whole checked config in view
        errors.extend(rule(out))
    for instance in options.values():  # a plugin option's own check(), if its schema has one
        check = getattr(instance, "check", None)
        if check is not None:
            errors.extend(check(out))
    if errors:
        raise ConfigError(errors)
    return out
