"""`difftrain components | sample | eval | report`: small argparse commands over a finished run."""

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
    parser.add_argument("group", nargs="?", help="show only this group")
    opts = parser.parse_args(args)
    groups = registry.groups()
    if opts.group and opts.group not in groups:
        raise UserError(f"unknown group '{opts.group}'; groups: {', '.join(groups)}")
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
    console.print(table)
    return 0


def _load_run(run_dir: str):
    """The run's config, trained model (EMA weights) and schedule, from final/ or the latest checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from difftrain import registry
    from difftrain.engine import checkpoint as ckpt

    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a difftrain run folder (no config.yaml); pass the output_dir of a run")
    cfg = OmegaConf.to_container(OmegaConf.load(root / "config.yaml"))
    schedule = registry.build("scheduler", cfg["scheduler"])
    final = root / "final" / "unet"
    if (final / "config.json").is_file():
        from diffusers import UNet2DModel

        model = UNet2DModel.from_pretrained(str(final))
    else:
        latest = ckpt.resolve_resume("latest", root)
        if latest is None:
            raise UserError(f"run '{run_dir}' has neither final/unet nor a complete checkpoint to sample from")
        model = registry.build("model", {**cfg["model"], "pretrained": None})
        tensors = ckpt.read_tensors(latest, "model.safetensors")
        if (latest / "ema.safetensors").is_file():
            tensors.update(ckpt.read_tensors(latest, "ema.safetensors"))
        model.load_state_dict(tensors)
    device = "cuda" if torch.cuda.is_available() and not cfg["trainer"]["cpu"] else "cpu"
    return cfg, model.to(device).eval(), schedule, device


def sample_command(args: list[str]) -> int:
    """Write a grid PNG of samples from a finished run (EMA weights)."""
    import torch

    from difftrain.components.sampling import sample
    from difftrain.engine.sampling import save_grid

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
    from difftrain.cli.sample_t2i import sample_t2i, t2i_family

    if t2i_family(opts.run_dir):
        return sample_t2i(opts)
    if opts.prompt:
        raise UserError("--prompt is for text-to-image runs (model=sd15 or sd3); this run takes --labels")
    opts.num = opts.num or 8
    cfg, model, schedule, device = _load_run(opts.run_dir)
    num_classes = cfg["model"].get("num_class_embeds")
    labels = None
    if opts.labels:
        try:
            values = [int(v) for v in opts.labels.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--labels '{opts.labels}' must be comma-separated integers, e.g. 0,1,7") from None
        if not num_classes or any(not 0 <= v < num_classes for v in values):
            raise UserError(f"--labels {values} must lie in [0, {num_classes}) for this model"
                            if num_classes else "this model is unconditional: drop --labels")
        labels = torch.tensor(values).repeat_interleave(opts.num)
    elif num_classes:
        labels = torch.arange(num_classes).repeat_interleave(opts.num)
    n = len(labels) if labels is not None else opts.num
    res, ch = model.config.sample_size, model.config.in_channels
    cond = {"class_labels": None if labels is None else labels.to(device)}
    images = sample(lambda x, t: model(x, t, return_dict=False, **cond)[0], schedule, (n, ch, res, res),
                    opts.steps, opts.seed, device)
    tag = opts.labels.replace(",", "-") if opts.labels else "all"
    out = Path(opts.out) if opts.out else Path(opts.run_dir) / "samples" / f"sample_{tag}.png"
    save_grid(images, out, nrow=opts.num if labels is not None else 8, upscale=max(1, 64 // res))
    print(out)
    return 0


def eval_command(args: list[str]) -> int:
    """Digits-classifier accuracy on class-conditional samples of a finished run."""
    from difftrain.engine.sampling import evaluate_digits

    parser = argparse.ArgumentParser(prog="difftrain eval", description=eval_command.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--samples-per-label", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    opts = parser.parse_args(args)
    from difftrain.cli.sample_t2i import t2i_family

    if t2i_family(opts.run_dir):
        raise UserError("difftrain eval measures digits-classifier accuracy: it needs a run on data=digits, not a "
                        "text-to-image run (use difftrain sample RUN_DIR --prompt ...)")
    cfg, model, schedule, device = _load_run(opts.run_dir)
    if cfg["data"]["name"] != "digits":
        raise UserError("difftrain eval measures digits-classifier accuracy: it needs a run on data=digits")
    e = cfg["eval"]
    result = evaluate_digits(model, schedule, opts.samples_per_label or e["samples_per_label"],
                             opts.steps or e["inference_steps"], e["seed"], device,
                             cfg["data"]["resolution"], cfg["data"]["num_classes"])
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
