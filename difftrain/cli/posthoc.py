"""`difftrain ema-synth | ema-sweep RUN_DIR`: post-hoc EMA of a run trained with ema=posthoc (engine/posthoc.py).

Light at import: argparse here, torch/diffusers only inside the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difftrain.errors import UserError


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("run_dir")
    parser.add_argument("--sigma-rel", required=True,
                        help="targets: comma-separated (0.05,0.12,0.2) or start:stop:count (0.02:0.3:8)")
    parser.add_argument("--step", type=int, default=None, help="target step (default: the newest snapshot's)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/ema_synth)")
    return parser


def _setup(opts, evaluates: bool):
    """(run folder, its config, targets, device, output folder); ema-synth computes nothing: the CPU."""
    import torch

    from difftrain.cli.commands import read_run_config
    from difftrain.engine.posthoc import parse_sigma_rels

    root, cfg = read_run_config(opts.run_dir)
    if opts.step is not None and opts.step < 1:
        raise UserError("--step must be a positive optimizer step (or omitted: the newest snapshot's step)")
    on_gpu = evaluates and torch.cuda.is_available() and not cfg["trainer"]["cpu"]
    out = Path(opts.out) if opts.out else root / "ema_synth"
    return root, cfg, parse_sigma_rels(opts.sigma_rel), "cuda" if on_gpu else "cpu", out


def ema_synth_command(args: list[str]) -> int:
    """Synthesise EMA profiles of the given sigma_rel from the run's snapshots; per target, what the run's family
    exports: a diffusers model folder, a LoRA file (LoRA runs) or a pipeline (full text-to-image fine-tunes)."""
    from difftrain.engine.posthoc import synth_all

    opts = _parser("difftrain ema-synth", ema_synth_command.__doc__).parse_args(args)
    root, cfg, sigmas, device, out = _setup(opts, evaluates=False)
    for synthesis, folder, _ in synth_all(root, cfg, sigmas, opts.step, out, device):
        print(f"sigma_rel {synthesis.sigma_rel:.4f} (gamma {synthesis.gamma:.3f}) at step {synthesis.step}: "
              f"fit error {synthesis.fit_error:.2e}, {len(synthesis.weights)} snapshots -> {folder}")
    return 0


def ema_sweep_command(args: list[str]) -> int:
    """Synthesise and evaluate a range of sigma_rel; table, CSV and PNG of the metric, and the best one."""
    from difftrain.engine.posthoc import sweep

    parser = _parser("difftrain ema-sweep", ema_sweep_command.__doc__)
    parser.add_argument("--metric", choices=("accuracy", "val_loss"), default="accuracy",
                        help="digits-classifier accuracy (data=digits) or the fixed-noise validation loss")
    opts = parser.parse_args(args)
    root, cfg, sigmas, device, out = _setup(opts, evaluates=True)
    result = sweep(root, cfg, sigmas, opts.metric, opts.step, out, device)
    print(f"{'sigma_rel':>9}  {'gamma':>8}  {opts.metric:>10}  {'fit error':>9}")
    for row in result["rows"]:
        mark = "  <- best" if row is result["best"] else ""
        print(f"{row['sigma_rel']:9.4f}  {row['gamma']:8.3f}  {row[opts.metric]:10.4f}  {row['fit_error']:9.2e}{mark}")
    best = result["best"]
    print(f"best sigma_rel {best['sigma_rel']:.4f} ({opts.metric} {best[opts.metric]:.4f}): {best['model']}")
    print(f"table: {result['csv']}" + (f", plot: {result['png']}" if result["png"] else " (no plot: no matplotlib)"))
    return 0
