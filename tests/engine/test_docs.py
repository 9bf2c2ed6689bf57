"""Docs that are generated stay true, and the config tree mirrors the registry 1:1."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from difftrain import registry

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from gen_config_reference import render
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "configuration.md").read_text() == render(), \
        "docs/configuration.md is stale: run python docs/gen_config_reference.py"


def test_conf_tree_mirrors_registry():
    conf = REPO / "conf"
    # conf/experiment/ holds whole-config presets, not options of a group (tests/config/test_experiments.py)
    on_disk = {(p.parent.name, p.stem) for p in conf.glob("*/*.yaml") if p.parent.name != "experiment"}
    registered = {(e.group, e.name) for e in registry.entries()}
    assert on_disk == registered
    for group, name in on_disk:
        node = yaml.safe_load((conf / group / f"{name}.yaml").read_text())
        assert str(node["name"]) == name  # the option file names itself (a quoted 'on' stays a string)


def test_every_registered_option_validates_with_its_yaml(tmp_path):
    from conftest import tiny_config

    for entry in registry.entries():
        if entry.group == "data" and entry.name == "imagefolder":
            tiny_config(tmp_path, "data=imagefolder", f"data.path={tmp_path}")
            continue
        if (entry.group, entry.name) in {("model", "sd15"), ("model", "sdxl"), ("model", "sd3"), ("model", "flux"), ("data", "hf"),
                                        ("data", "dreambooth"), ("data", "sources"), ("loss", "huber"), ("loss", "l1"),
                                        ("lora", "on")}:
            continue  # text-to-image options: tests/t2i/test_t2i_config.py validates them with their YAML
        if (entry.group, entry.name) == ("lr_scheduler", "constant"):  # TINY sets a warm-up, which constant has not
            tiny_config(tmp_path, "lr_scheduler=constant", "lr_scheduler.warmup_steps=0")
            continue
        tiny_config(tmp_path, f"{entry.group}={entry.name}")


def test_unknown_names_list_the_registered_ones():
    import pytest

    with pytest.raises(registry.UnknownComponentError, match="registered loss_weighting options: none, "
                       "sigma_sqrt, cosmap, min_snr"):
        registry.get("loss_weighting", "snr")


def test_plugins_register_through_entry_points(monkeypatch):
    from importlib.metadata import EntryPoint

    calls = []

    def fake_entry_points(group):
        assert group == registry.ENTRY_POINT_GROUP
        return [EntryPoint("demo", "plugin_demo:register", group)]

    module = type(sys)("plugin_demo")

    def register():
        calls.append(1)
        registry.register("loss_weighting", "demo_weighting", "plugin_demo:build", "a plugin weighting",
                          replace=True)

    module.register = register
    monkeypatch.setitem(sys.modules, "plugin_demo", module)
    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "demo_weighting" in registry.names("loss_weighting")
    assert calls == [1]
    registry._REGISTRY["loss_weighting"].pop("demo_weighting")
