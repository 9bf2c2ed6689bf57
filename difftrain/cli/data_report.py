"""`difftrain data-report [overrides]` (also `difftrain train --dry-run [overrides]`): what a run would
train on, without loading any model weights or writing anything but the folder scan's index cache.

It composes and validates the config as `train` does, reads the model's size multiple from its config files
(`size_multiple_of`), indexes the data (image headers only), plans the buckets, and prints the buckets with
their counts, the held-out validation samples and every image that cannot be trained on. Exit status: 0, or 2
when the run would stop on bad images (data.on_bad_image=error).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difftrain.errors import UserError


def build_report(cfg: dict) -> tuple[str, int]:
    """(report text, number of images a run with this config cannot train on)."""
    from difftrain import registry
    from difftrain.engine.setup import size_multiple

    multiple = size_multiple(cfg["model"])
    data_entry = registry.get("data", cfg["data"]["name"])
    node = dict(cfg["data"])
    if "on_bad_image" in node:  # list every problem instead of stopping at them
        node["on_bad_image"] = "skip"
    node, pending = without_missing_class_images(node)
    fields = {f.name for f in dataclasses.fields(data_entry.schema)}
    folder = Path(node["cache_dir"]).expanduser() if node.get("cache_dir") else None
    data = data_entry.load()(data_entry.schema(**{k: v for k, v in node.items() if k in fields}),
                             interpolation=registry.build("interpolation", cfg["interpolation"]), seed=cfg["seed"],
                             size_multiple=multiple, cache_folder=folder)
    trainer = cfg["trainer"]
    order = data.order(trainer["batch_size"], trainer["grad_accum"], 1, cfg["seed"])
    lines = [f"data={cfg['data']['name']} for model={cfg['model']['name']} (image sides multiples of {multiple})",
             data.report(),
             f"{order.micro_per_epoch} micro-batches of {trainer['batch_size']} per epoch on one process "
             f"(a bucket's last partial batch is left out of that epoch)", *pending]
    return "\n".join(lines), len(data.skipped)


def without_missing_class_images(node: dict) -> tuple[dict, list[str]]:
    """The data node without the prior preservation of sources whose class images are not all there yet
    (`difftrain train` generates them first; a report loads no weights), and a line for each."""
    from difftrain.engine.class_images import missing_class_images

    lines: list[str] = []

    def check(entry: dict, merged: dict, label: str) -> dict:
        if not merged.get("with_prior_preservation") or not merged.get("class_data_dir"):
            return entry
        missing = len(missing_class_images(merged))
        if not missing:
            return entry
        lines.append(f"{label}: {missing} of {merged['num_class_images']} class images of '{merged['class_prompt']}' "
                     f"are not in {merged['class_data_dir']} yet; difftrain train generates them before training "
                     "(not counted above)")
        return {**entry, "with_prior_preservation": False}

    if node.get("sources"):
        node = {**node, "sources": [check(e, {**node, **e}, f"data.sources[{i}]") if isinstance(e, dict) else e
                                    for i, e in enumerate(node["sources"])]}
    else:
        node = check(node, node, "data")
    return node, lines


def data_report_command(args: list[str]) -> int:
    from difftrain.cli.console import print_error
    from difftrain.cli.train import compose_config
    from difftrain.config.validate import ConfigError, validate

    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        cfg = validate(compose_config([a for a in args if a != "--dry-run"]))
    except ConfigError as exc:
        print_error("invalid config:\n  - " + "\n  - ".join(exc.errors))
        return 2
    from difftrain import progress
    from difftrain.engine.run_files import quiet_console

    quiet_console()  # library warnings and bars are not the report's (a run writes them to train.log)
    shown_before = progress.configure(plain=not cfg["trainer"]["progress"], enabled=True)  # as a run shows them
    try:
        text, bad = build_report(cfg)
    finally:
        progress.configure(**shown_before)
    print(text)
    if bad and cfg["data"].get("on_bad_image", "error") == "error":
        raise UserError(f"{bad} images cannot be trained on (listed above); fix or remove them, or set "
                        "data.on_bad_image=skip")
    return 0
