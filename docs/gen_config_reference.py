"""Regenerate docs/configuration.md from the schemas, the rules and the registry: python docs/gen_config_reference.py"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from difftrain import registry
from difftrain.config import schema
from difftrain.config.fields import describe_type
from difftrain.config.rules import RULES

CONF = Path(__file__).resolve().parents[1] / "conf"

HEADER = """# Configuration reference

Generated from the schemas (`difftrain/config/schema*.py`), the rules (`difftrain/config/rules.py`), the
preset files of `conf/` and the registry by `python docs/gen_config_reference.py`; `tests/engine/test_docs.py`
fails when it is out of date.

`difftrain train` composes `conf/train.yaml`: one option per config group, plus the top-level keys and
sections below. Choose an option with `group=option` and set a key with `group.key=value`
(`difftrain train scheduler=sd3 ema.decay=0.999`). Every key is checked before anything is built: an unknown
key, a wrong type, a value out of range or a combination without meaning (the [rules](#rules)) exits with
code 2 and lists every problem.

The schema holds every default, and `conf/<group>/<option>.yaml` shows the same values
(`tests/config/test_yaml_matches_schema.py`). An option that differs from a sibling by one key is a
preset of it: its YAML file is `defaults: [sibling]` plus that key (`scheduler=ddpm_v`, `ema=ema_warmup`,
`distributed=deepspeed_zero3`), and a key that contradicts the option's name is rejected. An absent
component is spelled `none` in every group (`ema=none`, `dream=none`, `lora=none`, `loss_weighting=none`).

Combinations with a defined meaning (documented in docs/components.md):
- sigma-defined loss weightings (`sigma_sqrt`, `cosmap`) on DDPM schedules use the flow-equivalent
  sigma b / (a + b) of x_t = a x0 + b eps (same SNR);
- `min_snr` works for epsilon, v, sample and flow targets (with `scheduler.precondition_outputs=true` the x0
  weight min(SNR, gamma) is used);
- `dream=on` works for every scheduler (docs/dream.md).

Text-to-image (`model=sd15|sd3`, docs/fine-tuning-sd15.md, docs/fine-tuning-sd3.md): `model=sd3` also
selects `scheduler=sd3` and `weighting_scheme=logit_normal`; the pipeline's scheduler config supplies the
tables (betas, timesteps, shift), the `scheduler` group the prediction type, `rescale_betas_zero_snr` and
`precondition_outputs`. `trainer.mixed_precision=fp16` without a CUDA GPU is rejected when the run starts.
"""


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fields_table(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        meta = f.metadata
        allowed = []
        if meta.get("choices"):
            allowed.append(", ".join(map(str, meta["choices"])))
        for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if meta.get(key) is not None:
                allowed.append(f"{word} {meta[key]:.6g}")
        rows.append(f"| `{f.name}` | {describe_type(hints[f.name])} | `{_default(f)}` | {'; '.join(allowed)} | "
                    f"{meta.get('doc', '')} |")
    return rows


def preset(group: str, name: str) -> tuple[str, dict] | None:
    """(base option, the keys the preset sets) when conf/<group>/<name>.yaml is `defaults: [base]` + keys."""
    path = CONF / group / f"{name}.yaml"
    node = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(node, dict) or "defaults" not in node:
        return None
    bases = [d for d in node["defaults"] if d != "_self_"]
    if len(bases) != 1 or bases[0] not in registry.names(group):  # e.g. model=sd3 also overrides other groups
        return None
    return bases[0], {k: v for k, v in node.items() if k not in ("defaults", "name")}


def _yaml(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _rule_line(rule) -> str:
    return f"- `{rule.__name__}`: {rule.__doc__.strip().splitlines()[0]}"


def experiment_rows() -> list[str]:
    """One row per conf/experiment/ preset: its name, the groups it chooses and its own description line."""
    rows = ["| preset | chooses | what it is |", "|---|---|---|"]
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())
        chosen = [f"`{k.removeprefix('override /')}={v}`" for d in node.get("defaults", []) if isinstance(d, dict)
                  for k, v in d.items()]
        about = next(line[2:] for line in path.read_text().splitlines()[1:] if line.startswith("# "))
        rows.append(f"| `{path.stem}` | {', '.join(chosen)} | {about} |")
    return rows


def render() -> str:
    out = [HEADER, "## Rules", "",
           "Checked after every key, in this order (`difftrain/config/rules.py`, one function each):", ""]
    out += [_rule_line(rule) for rule in RULES]
    out += ["", "## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (tp, f) in schema.TOP_LEVEL_SCALARS.items():
        out.append(f"| `{key}` | {describe_type(tp)} | `{f.default}` | {f.metadata['doc']} |")
    for section, cls in schema.SECTIONS.items():
        out += ["", f"## `{section}`", ""] + _fields_table(cls)
    out += ["", "## Config groups", ""]
    for group in registry.groups():
        out += [f"### `{group}`", ""]
        for name in registry.names(group):
            entry = registry.get(group, name)
            out += [f"#### `{group}={name}`", "", entry.description, ""]
            made_of = preset(group, name)
            if made_of is not None:
                base, keys = made_of
                sets = ", ".join(f"`{k}: {_yaml(v)}`" for k, v in keys.items())
                out += [f"Preset of `{group}={base}` (`conf/{group}/{name}.yaml`): the same keys, with {sets}.", ""]
                continue
            rows = _fields_table(entry.schema) if entry.schema else []
            out += (rows if len(rows) > 2 else ["(no keys)"]) + [""]
    out += ["## Experiment presets", "",
            "Whole configs in `conf/experiment/` (`# @package _global_`: groups chosen with `override /group: option`",
            "plus keys), added with a plus: `difftrain train +experiment=NAME model.pretrained=... data.path=...`.",
            "Command-line choices and keys win over the preset's; required paths stay required. Each file comments",
            "its values (docs/ecosystem.md#presets).", ""] + experiment_rows()
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("configuration.md").write_text(render())
