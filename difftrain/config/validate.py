"""Validate a composed, resolved config (plain dict) against the schemas, reporting every error.

Runs before torch is imported: a typo, a wrong type, an out-of-range value or a meaningless
combination is reported in well under a second, all at once, and nothing is built or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from difftrain import registry
from difftrain.config import schema
from difftrain.config.fields import check_bounds, coerce, describe_type


class ConfigError(ValueError):
    """One or more config problems; `errors` lists them (each names the key and the fix)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_dataclass(prefix: str, node: Any, cls: type, errors: list[str]) -> dict | None:
    """Check `node` against dataclass `cls`; returns the node with defaults filled and values coerced."""
    if not isinstance(node, dict):
        errors.append(f"{prefix} must be a mapping, got {type(node).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in fields:
            allowed = sorted(fields)
            errors.append(f"{prefix}.{key} is not a key of {prefix}{_suggest(key, allowed)}; "
                          f"allowed keys: {', '.join(allowed)}")
            continue
        ok, coerced = coerce(value, hints[key])
        if not ok:
            errors.append(f"{prefix}.{key} must be {describe_type(hints[key])}, got {value!r}")
            continue
        problem = check_bounds(coerced, fields[key].metadata) if coerced is not None else None
        if problem:
            errors.append(f"{prefix}.{key}={coerced!r} {problem}")
            continue
        out[key] = coerced
    for name, f in fields.items():  # defaults for keys the YAML left out
        if name not in node:
            if f.default is not dataclasses.MISSING:
                out[name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[name] = f.default_factory()
    return out


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
    for instance in options.values():  # cross-key checks, with the whole config in view
        check = getattr(instance, "check", None)
        if check is not None:
            errors.extend(check(out))
    errors.extend(_combinations(out))
    if errors:
        raise ConfigError(errors)
    return out


def _combinations(cfg: dict) -> list[str]:
    """Combinations that have no meaning (each documented in docs/configuration.md)."""
    errors = []
    if cfg.get("resume") and not cfg.get("output_dir"):
        errors.append("resume needs output_dir: pass the run folder to continue, "
                      "e.g. output_dir=outputs/2026-01-01_12-00-00 resume=latest")
    elif cfg.get("resume") and not Path(cfg["output_dir"]).expanduser().is_dir():
        errors.append(f"resume={cfg['resume']} but output_dir '{cfg['output_dir']}' does not exist; "
                      "pass the folder of the run to continue")
    model, data = cfg.get("model", {}), cfg.get("data", {})
    val = cfg.get("validation", {})
    n_classes = model.get("num_class_embeds")
    if n_classes is not None and data.get("num_classes") is not None and data["num_classes"] > n_classes:
        errors.append(f"data.num_classes ({data['num_classes']}) exceeds model.num_class_embeds ({n_classes})")
    labels = val.get("labels") or []
    if n_classes is not None and any(not 0 <= lab < n_classes for lab in labels):
        errors.append(f"validation.labels {labels} must lie in [0, {n_classes})")
    if model.get("sample_size") not in (None, data.get("resolution")) and not model.get("pretrained"):
        errors.append(f"model.sample_size ({model.get('sample_size')}) differs from data.resolution "
                      f"({data.get('resolution')}); leave model.sample_size at ${{data.resolution}}")
    if cfg.get("trainer", {}).get("mixed_precision") == "fp16" and cfg.get("trainer", {}).get("cpu"):
        errors.append("trainer.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    return errors
