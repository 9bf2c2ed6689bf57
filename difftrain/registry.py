"""The component registry: config group -> option name -> how to build it.

Entries are declared with a dotted `target` ("package.module:callable") that is imported only
when the component is built, so listing, validating and `--help` stay free of torch. Each entry
also names its config schema (a plain dataclass in difftrain.config.schema), which is how config
validation knows the allowed keys of every option.

Third-party packages add components through the entry-point group `difftrain.components`: each
entry point refers to a callable that is called once with no arguments and calls `register(...)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "difftrain.components"
RENAMED = {"off": "none"}  # old option name -> new one (every group spells an absent component `none`)


@dataclass(frozen=True)
class Entry:
    group: str
    name: str
    target: str  # "module:callable", imported lazily
    description: str
    schema: type | None = None  # dataclass listing the option's config keys

    def load(self):
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


class UnknownComponentError(ValueError):
    def __init__(self, group: str, name: str, known: list[str]):
        self.group, self.name, self.known = group, name, known
        if not known:
            msg = f"unknown component group {group!r}; groups: {', '.join(groups()) or '(none)'}"
        else:
            msg = f"unknown {group} {name!r}; registered {group} options: {', '.join(known)}"
            if RENAMED.get(name) in known:
                msg += f" (renamed: use {group}={RENAMED[name]})"
        super().__init__(msg)


_REGISTRY: dict[str, dict[str, Entry]] = {}
_plugins_loaded = False


def register(
    group: str, name: str, target: str, description: str, schema: type | None = None, *, replace: bool = False
) -> Entry:
    options = _REGISTRY.setdefault(group, {})
    if name in options and not replace:
        raise ValueError(f"{group} option {name!r} is already registered (pass replace=True to override)")
    entry = options[name] = Entry(group, name, target, description, schema)
    return entry


def _ensure_loaded() -> None:
    """Built-ins first, then plugins (once per process)."""
    global _plugins_loaded
    import difftrain.builtin_components  # noqa: F401  (registers the built-ins on import)

    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        hook = ep.load()
        if callable(hook):
            hook()


def groups() -> list[str]:
    _ensure_loaded()
    return list(_REGISTRY)


def names(group: str) -> list[str]:
    _ensure_loaded()
    return list(_REGISTRY.get(group, {}))


def get(group: str, name: str) -> Entry:
    _ensure_loaded()
    options = _REGISTRY.get(group)
    if options is None or name not in options:
        raise UnknownComponentError(group, name, list(options or {}))
    return options[name]


def entries() -> list[Entry]:
    _ensure_loaded()
    return [entry for options in _REGISTRY.values() for entry in options.values()]


def build(group: str, node: Mapping[str, Any], **context: Any) -> Any:
    """Instantiate the option named by node["name"]: target(options, **context).

    `options` is the option's validated schema object (`entry.schema(**node)`: its fields are the only
    source of the defaults), or the plain dict for a plugin option registered without a schema. `node`
    must be plain Python (OmegaConf containers are converted at the CLI boundary).
    """
    entry = get(group, str(node["name"]))
    options = entry.schema(**node) if entry.schema is not None else dict(node)
    return entry.load()(options, **context)
