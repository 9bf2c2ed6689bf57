"""`difftrain components | sample | eval | report`: small argparse commands over a finished run.

Thin: `sample` and `eval` read the run's config.yaml, look its `model` option up in the registry and let
that family load the run (`load_finished`) and generate; nothing here imports diffusers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difftrain.errors import UserError


def components_command(args: list[str]) -> int:
    """Every registered group, its options and a one-line description (rich table)."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from difftrain import registry

    parser = argparse.ArgumentParser(prog="difftrain components", description=components_command.__doc__)
    parser.add_argument("group", nargs="?", help="show only this group (experiment: the shipped presets)")
    opts = parser.parse_args(args)
    groups = registry.groups()
    if opts.group and opts.group not in (*groups, "experiment"):
        raise UserError(f"unknown group '{opts.group}'; groups: {', '.join(groups)} (and experiment, the presets)")
    table = Table(title="difftrain components", show_lines=False)
    for column in ("group", "option", "description", "keys"):
        table.add_column(column, overflow="fold")
    for group in groups:
        if opts.group and group != opts.group:
            continue
        for i, name in enumerate(registry.names(group)):
            entry = registry.get(group, name)
            keys = [f.name for f in dataclasses.fields(entry.schema)] if entry.schema else []
            table.add_row(group if i == 0 else "", name, entry.description,
                          ", ".join(k for k in keys if k != "name"))
        table.add_section()
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold names at 80 columns
        console = Console(width=160)
    if opts.group != "experiment":
        console.print(table)
    if not opts.group or opts.group == "experiment":
        console.print(_presets_table())
    return 0


def _presets_table():
    """The shipped conf/experiment/ presets: whole configs, `difftrain train +experiment=NAME ...`."""
    from rich.table import Table

    from difftrain.cli.train import experiment_presets

    table = Table(title="experiment presets (difftrain train +experiment=NAME model.pretrained=... data.path=...)")
    for column in ("preset", "description"):
        table.add_column(column, overflow="fold")
    for name, description in experiment_presets().items():
        table.add_row(name, description)
    return table


def read_run_config(run_dir: str) -> tuple[Path, dict]:
    """The run folder and its config.yaml (what the run was trained with)."""
    from omegaconf import OmegaConf

    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a difftrain run folder (no config.yaml); pass the output_dir of a run")
    return root, OmegaConf.to_container(OmegaConf.load(root / "config.yaml"))


def latest_checkpoint_tensors(root: Path) -> dict:
    """The latest complete checkpoint's model weights with its EMA weights laid over them."""
    from difftrain.engine import checkpoint as ckpt

    latest = ckpt.resolve_resume("latest", root)
    if latest is None:
        raise UserError(f"run '{root}' has neither final outputs nor a complete checkpoint to sample from")
    tensors = ckpt.read_tensors(latest, "model.safetensors")
    if (latest / "ema.safetensors").is_file():
        ema = ckpt.read_tensors(latest, "ema.safetensors")  # only the model's names (ema=posthoc also stores
        tensors.update({k: v for k, v in ema.items() if k in tensors})  # its other profiles under profile<k>/)
    return tensors


def load_run(run_dir: str):
    """(config, FinishedRun): the run's outputs, loaded by the model family recorded in its config."""
    from functools import partial

    from difftrain import registry

    root, cfg = read_run_config(run_dir)  # first: a wrong folder fails before torch is imported
    import torch

    family = registry.get("model", cfg["model"]["name"]).load()  # a families.protocol.FamilyClass
    device = "cuda" if torch.cuda.is_available() and not cfg["trainer"]["cpu"] else "cpu"
    return cfg, family.load_finished(root, cfg, device, partial(latest_checkpoint_tensors, root))


def parse_labels(text: str) -> list[int]:
    """--labels 0,1,7 as integers (checked before the run's model is loaded)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--labels '{text}' must be comma-separated integers, e.g. 0,1,7")
    return values


def _label_request(opts, run, values: list[int] | None):
    """(SampleRequest, file tag) of --labels (`values`, parsed; default: every class) for a class-conditional
    or an unconditional run."""
    from difftrain.families.protocol import SampleRequest

    if opts.prompt:
        raise UserError("--prompt is for text-to-image runs (model=sd15 or sd3); this run takes --labels")
    num_classes = run.num_classes if run.conditioning == "labels" else None
    labels = None
    if values:
        if not num_classes or any(not 0 <= v < num_classes for v in values):
            raise UserError(f"--labels {values} must lie in [0, {num_classes}) for this model"
                            if num_classes else "this model is unconditional: drop --labels")
        labels = tuple(values)
    elif num_classes:
        labels = tuple(range(num_classes))
    request = SampleRequest(labels=labels, per_condition=opts.num or 8, steps=opts.steps, seed=opts.seed)
    return request, opts.labels.replace(",", "-") if opts.labels else "all"


def _prompt_request(opts):
    from difftrain.families.protocol import SampleRequest

    if opts.labels:
        raise UserError("--labels is for class-conditional runs; a text-to-image run takes --prompt")
    if not opts.prompt:
        raise UserError('give at least one --prompt "a photo of ..." (repeat --prompt for more rows)')
    request = SampleRequest(prompts=tuple(opts.prompt), per_condition=opts.num or 4, steps=opts.steps,
                            seed=opts.seed, guidance_scale=opts.guidance)
    return request, "prompts"


def sample_command(args: list[str]) -> int:
    """Write a grid PNG of samples from a finished run (EMA weights)."""
    parser = argparse.ArgumentParser(prog="difftrain sample", description=sample_command.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--labels", default=None, help="comma-separated class labels, e.g. 0,1,7")
    parser.add_argument("--prompt", action="append", help="text-to-image runs: a prompt (repeat for more rows)")
    parser.add_argument("--num", type=int, default=None,
                        help="samples per label or prompt (or in total if unconditional); default 8, 4 per prompt")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=None, help="text-to-image: guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples/sample_<labels>.png)")
    opts = parser.parse_args(args)
    if (opts.num is not None and opts.num < 1) or opts.steps < 1:
        raise UserError("--num and --steps must be positive integers")
    if opts.labels and opts.prompt:
        raise UserError("give --labels (class-conditional runs) or --prompt (text-to-image runs), not both")
    labels = parse_labels(opts.labels) if opts.labels else None  # a typo fails before the model loads
    _, run = load_run(opts.run_dir)
    request, tag = _prompt_request(opts) if run.conditioning == "prompts" else _label_request(opts, run, labels)
    images, nrow = run.generate(request)
    from difftrain.engine.evaluation import save_grid  # torch and torchvision: only once there is a grid

    out = Path(opts.out) if opts.out else Path(opts.run_dir) / "samples" / f"sample_{tag}.png"
    save_grid(images, out, nrow=nrow, upscale=max(1, 64 // images.shape[-1]))
    print(out)
    return 0


def eval_command(args: list[str]) -> int:
    """Digits-classifier accuracy on class-conditional samples of a finished run."""
    parser = argparse.ArgumentParser(prog="difftrain eval", description=eval_command.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--samples-per-label", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    opts = parser.parse_args(args)
    cfg, run = load_run(opts.run_dir)
    if run.conditioning == "prompts":
        raise UserError("difftrain eval measures digits-classifier accuracy: it needs a run on data=digits, not a "
                        "text-to-image run (use difftrain sample RUN_DIR --prompt ...)")
    if cfg["data"]["name"] != "digits":
        raise UserError("difftrain eval measures digits-classifier accuracy: it needs a run on data=digits")
    if run.conditioning != "labels":
        raise UserError("difftrain eval measures digits-classifier accuracy of class-conditional samples: this "
                        "run's model is unconditional (model.num_class_embeds=null)")
    from difftrain.engine.evaluation import digits_accuracy

    e = cfg["eval"]
    result = digits_accuracy(run.generate, cfg["data"]["num_classes"], opts.samples_per_label or e["samples_per_label"],
                             opts.steps or e["inference_steps"], e["seed"])
    (Path(opts.run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"digits accuracy: {result['accuracy']:.1%} on {result['samples']} samples "
          f"(per label: {', '.join(f'{v:.0%}' for v in result['per_label'])})")
    return 0


def report_command(args: list[str]) -> int:
    from difftrain.cli.report import report

    parser = argparse.ArgumentParser(prog="difftrain report", description="summarise a multirun sweep")
    parser.add_argument("sweep_dir")
    opts = parser.parse_args(args)
    return report(Path(opts.sweep_dir))
