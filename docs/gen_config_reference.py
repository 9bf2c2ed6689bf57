"""Regenerate docs/configuration.md from the schemas and the registry: python docs/gen_config_reference.py"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from difftrain import registry
from difftrain.config import schema
from difftrain.config.fields import describe_type

HEADER = """# Configuration reference

Generated from the schemas (`difftrain/config/schema.py`) and the registry by
`python docs/gen_config_reference.py`; `tests/engine/test_docs.py` fails when it is out of date.

`difftrain train` composes `conf/train.yaml`: one option per config group, plus the top-level keys and
sections below. Choose an option with `group=option` and set a key with `group.key=value`
(`difftrain train scheduler=sd3 ema.decay=0.999`). Every key is checked before anything is built: an unknown
key, a wrong type, a value out of range or a combination without meaning exits with code 2 and lists every
problem.

Combinations with a defined meaning (documented in docs/components.md):
- sigma-defined loss weightings (`sigma_sqrt`, `cosmap`) on DDPM schedules use the flow-equivalent
  sigma b / (a + b) of x_t = a x0 + b eps (same SNR);
- `min_snr` works for epsilon, v, sample and flow targets (with `scheduler.precondition_outputs=true` the x0
  weight min(SNR, gamma) is used);
- `dream=on` works for every scheduler (docs/dream.md).

Rejected combinations: epsilon prediction with `scheduler.rescale_betas_zero_snr=true` (x0 is undefined at the
terminal step: use `scheduler=ddpm_v`); `ema.min_decay > ema.decay`; `ema.update_after_step >= trainer.max_steps`;
`lr_scheduler.warmup_steps > trainer.max_steps`; `resume` without an existing `output_dir`; a model whose
`sample_size` is not divisible by 2^(levels-1) or differs from `data.resolution`; `validation.labels` outside the
model's classes.

Text-to-image (`model=sd15|sd3`, docs/fine-tuning-sd15.md, docs/fine-tuning-sd3.md): `model.pretrained` is
required (a local path must be a folder with model_index.json); `model=sd15` trains with `scheduler=ddpm|ddpm_v`
and `model=sd3` with `scheduler=sd3` (which `model=sd3` selects, with `weighting_scheme=logit_normal`; the
pipeline's scheduler config supplies the tables, the group the prediction type / `precondition_outputs`); they need `data=imagefolder|hf` with RGB images and a resolution that
is a multiple of 8. Rejected: `lora=on` without a text-to-image model; `lora.train_text_encoder=true` with
`data.cache_text_embeddings=true`; the caption/cache keys of `data` (`cache_latents`, `cache_text_embeddings`,
`caption_dropout`, `instance_prompt`) with another model; `trainer.mixed_precision=fp16` without a CUDA GPU
(at start).
"""


def _fields_table(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = f.metadata
        allowed = []
        if meta.get("choices"):
            allowed.append(", ".join(map(str, meta["choices"])))
        for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if meta.get(key) is not None:
                allowed.append(f"{word} {meta[key]:.6g}")
        rows.append(f"| `{f.name}` | {describe_type(hints[f.name])} | `{default}` | {'; '.join(allowed)} | "
                    f"{meta.get('doc', '')} |")
    return rows


def render() -> str:
    out = [HEADER, "## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
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
            rows = _fields_table(entry.schema) if entry.schema else []
            out += (rows if len(rows) > 2 else ["(no keys)"]) + [""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("configuration.md").write_text(render())
