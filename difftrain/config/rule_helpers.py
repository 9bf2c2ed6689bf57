"""What the config rules share: the chosen option's node and schema class, and its non-default keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from difftrain import registry


def warmup_steps(value, max_steps: int) -> int:
    """`lr_scheduler.warmup_steps` in steps: a fraction (< 1) of max_steps, rounded, or the number itself."""
    return round(value * max_steps) if value < 1 else int(value)


def node_of(cfg: dict, group: str) -> dict:
    node = cfg.get(group)
    return node if isinstance(node, dict) else {}


def schema_of(cfg: dict, group: str) -> type | None:
    """The schema class of the option chosen for `group` (None when the group is absent or unknown)."""
    name = node_of(cfg, group).get("name")
    if name is None:
        return None
    try:
        return registry.get(group, str(name)).schema
    except registry.UnknownComponentError:
        return None


def chosen_is(cfg: dict, group: str, base: type) -> bool:
    schema = schema_of(cfg, group)
    return isinstance(schema, type) and issubclass(schema, base)


def schema_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def changed_keys(cfg: dict, group: str, keys) -> list[tuple[str, Any]]:
    """(key, value) of `keys` of the group whose value differs from the option's schema default."""
    schema = schema_of(cfg, group)
    if schema is None:
        return []
    defaults, node = schema_defaults(schema), node_of(cfg, group)
    return [(k, node[k]) for k in keys if k in node and k in defaults and node[k] != defaults[k]]
