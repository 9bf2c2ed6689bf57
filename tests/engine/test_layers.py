"""docs/architecture.md's layering holds: each package imports only the layers below it (imports inside
functions included), so the components stay usable alone and the engine never reaches into the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "difftrain"
ALLOWED = {
    "components": {"components", "errors"},
    "config": {"config", "registry", "errors"},
    "data": {"components", "config", "data", "errors", "progress"},  # config: the source schemas (data=sources)
    "families": {"components", "config", "data", "families", "errors", "registry"},
    "engine": {"components", "config", "data", "families", "engine", "errors", "progress", "registry"},
}


def imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "difftrain" else [f"difftrain.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        layers |= {name.split(".")[1] for name in names if name.startswith("difftrain.")}
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_layers_below(layer):
    offending = {}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        extra = imported_layers(path) - ALLOWED[layer]
        if extra:
            offending[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert offending == {}


def test_the_check_sees_imports_inside_functions():
    assert imported_layers(PACKAGE / "engine" / "run.py") >= {"engine", "errors"}
    assert "engine" in imported_layers(PACKAGE / "cli" / "commands.py")  # the CLI is above everything
