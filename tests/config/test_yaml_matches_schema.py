"""The schema is the one source of every default: each conf/<group>/<option>.yaml, composed by Hydra with the
option selected, shows exactly the schema's keys and defaults; a preset file is its base plus the keys it sets;
conf/train.yaml's sections and top-level keys are the schema's too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from difftrain import registry
from difftrain.config import schema

CONF = Path(__file__).resolve().parents[2] / "conf"

# Options that are a sibling plus keys (conf/<group>/<option>.yaml is `defaults: [base, _self_]` + these keys).
# ema_warmup's power 0.75 is diffusers' unconditional script's; the schema default (ema=ema) stays 2/3.
PRESETS = {
    ("scheduler", "ddpm_v"): ("ddpm", {"prediction_type": "v_prediction"}),
    ("ema", "ema_warmup"): ("ema", {"use_ema_warmup": True, "power": 0.75}),
    ("distributed", "deepspeed_zero3"): ("deepspeed_zero2", {"zero_stage": 3}),
    ("data", "dreambooth"): ("imagefolder", {"with_prior_preservation": True}),
}

# Keys whose YAML value is an interpolation, not a literal: compared before resolution with the string below,
# and after resolution (in the default config) with the schema default.
INTERPOLATED = {
    # the UNet takes its shape and classes from the data, so one override (data.resolution=...) moves both
    ("model", "unet2d"): {"sample_size": "${data.resolution}", "in_channels": "${data.channels}",
                          "out_channels": "${data.channels}", "num_class_embeds": "${data.num_classes}"},
    # the captioned-image sources default to the model's native resolution (sd15 512, sd3 1024) when it has one
    ("data", "imagefolder"): {"resolution": "${oc.select:model.resolution,64}"},
    ("data", "hf"): {"resolution": "${oc.select:model.resolution,512}"},
    ("data", "dreambooth"): {"resolution": "${oc.select:model.resolution,64}"},
    ("data", "sources"): {"resolution": "${oc.select:model.resolution,512}"},
}


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="difftrain.conf", version_base="1.3"):
        yield lambda *overrides: hydra_compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group,name", sorted((e.group, e.name) for e in registry.entries()))
def test_every_option_yaml_shows_the_schema_defaults(compose, group, name):
    entry = registry.get(group, name)
    cfg = compose(f"{group}={name}")
    raw = OmegaConf.to_container(cfg[group], resolve=False)
    expected = {**defaults(entry.schema), "name": name}
    if (group, name) in PRESETS:
        base, keys = PRESETS[group, name]
        expected.update(keys)
        node = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
        assert node == {"defaults": [base, "_self_"], "name": name, **keys}  # the preset file is only that
    for key, interpolation in INTERPOLATED.get((group, name), {}).items():
        assert raw.pop(key) == interpolation
        expected.pop(key)
    assert raw == expected


@pytest.mark.parametrize("group,name", sorted(INTERPOLATED))
def test_interpolated_keys_resolve_to_the_schema_default_in_the_default_config(compose, group, name):
    resolved = OmegaConf.to_container(compose(f"{group}={name}")[group], resolve=True)
    for key in INTERPOLATED[group, name]:
        assert resolved[key] == defaults(registry.get(group, name).schema)[key], key


def test_train_yaml_sections_and_top_level_keys_are_the_schema_defaults(compose):
    cfg = OmegaConf.to_container(compose(), resolve=False)
    assert set(cfg) == set(schema.TOP_LEVEL_SCALARS) | set(schema.SECTIONS) | set(schema.GROUPS)
    for section, cls in schema.SECTIONS.items():
        assert cfg[section] == defaults(cls), section
    assert {k: cfg[k] for k in schema.TOP_LEVEL_SCALARS} == {k: f.default for k, (_, f) in
                                                               schema.TOP_LEVEL_SCALARS.items()}


def test_every_schema_is_frozen():
    classes = {e.schema for e in registry.entries() if e.schema} | set(schema.SECTIONS.values())
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls.__name__
    with pytest.raises(dataclasses.FrozenInstanceError):
        schema.EMAConfig().decay = 0.5
