"""`difftrain report RUN_DIR|SWEEP_DIR`: a run's or a sweep's report.html (cli/report_html.py: settings, curves
and sample grids on one static page); for a -m sweep also a rich table, a CSV and two figures.

Reads the job records of the sweep folder (`difftrain.cli.sweep.collect`, so a sweep that was killed before
its end still reports the jobs that finished) and writes into SWEEP_DIR/report/:

* runs.csv          one row per run: overrides, status, final loss, validation loss, accuracy, time;
* loss_curves.png   the training loss of every run against the optimizer step (validation loss as dots);
* samples.png       the last sample grid of every run, side by side, captioned with its overrides;
* report.html       the comparison table, every run's curves and last grid on one page.

For a run folder (it holds config.yaml) only RUN_DIR/report.html is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from difftrain.errors import UserError


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _label(row: dict) -> str:
    return f"#{row['job']} {row['overrides']}".strip() or f"#{row['job']}"


def plot_losses(rows: list[dict], out: Path) -> Path | None:
    """Loss curves of every run with metrics (matplotlib, Agg backend); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for row in rows:
        lines = _metrics(Path(row["run_dir"]))
        train = [(m["step"], m["loss"]) for m in lines if m.get("loss") is not None]
        val = [(m["step"], m["val_loss"]) for m in lines if m.get("val_loss") is not None]
        if train:
            curves.append((row, train, val))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for row, train, val in curves:
        (line,) = ax.plot(*zip(*train), label=_label(row), linewidth=1.4)
        if val:
            ax.plot(*zip(*val), "o", color=line.get_color(), markersize=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (dots: validation loss)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{len(curves)} runs")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def last_grid(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def side_by_side(rows: list[dict], out: Path, caption_height: int = 28, pad: int = 8) -> Path | None:
    """The last sample grid of every run in one row, each with its overrides above it (PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    tiles = [(row, last_grid(Path(row["run_dir"]))) for row in rows]
    tiles = [(row, path) for row, path in tiles if path is not None]
    if not tiles:
        return None
    images = [Image.open(path).convert("RGB") for _, path in tiles]
    font = ImageFont.load_default()
    height = max(im.height for im in images) + caption_height + 2 * pad
    width = sum(max(im.width, 180) for im in images) + pad * (len(images) + 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (row, _), im in zip(tiles, images):
        tile_w = max(im.width, 180)
        text = _label(row)
        while draw.textlength(text, font=font) > tile_w and len(text) > 4:
            text = text[:-4] + "..."
        draw.text((x, pad), text, fill="black", font=font)
        canvas.paste(im, (x, pad + caption_height))
        x += tile_w + pad
    canvas.save(out)
    return out


def report(sweep_dir: Path) -> int:
    from rich.console import Console

    from difftrain.cli.report_html import write_run_report, write_sweep_report
    from difftrain.cli.sweep import COLUMNS, collect, rich_table, write_csv

    if not sweep_dir.is_dir():
        raise UserError(f"'{sweep_dir}' is not a folder; pass a run folder or the folder of a -m sweep "
                        "(hydra.sweep.dir)")
    if (sweep_dir / "config.yaml").is_file():  # one run
        print(f"wrote {write_run_report(sweep_dir)}")
        return 0
    rows = collect(sweep_dir)
    if not rows:
        raise UserError(f"'{sweep_dir}' holds no finished jobs (no <job number>/job.json) and no run (no "
                        "config.yaml); pass a run folder or the folder of a -m sweep, e.g. "
                        "outputs/sweep_2026-01-01_12-00-00")
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    write_csv(out / "runs.csv", rows)
    written = [out / "runs.csv", plot_losses(rows, out / "loss_curves.png"), side_by_side(rows, out / "samples.png"),
               write_sweep_report(sweep_dir, rows, COLUMNS, out / "report.html")]
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    failed = sum(r["status"] != "ok" for r in rows)
    console.print(rich_table(rows, f"sweep {sweep_dir} ({failed} of {len(rows)} failed)"))
    for path in written:
        if path is not None:
            console.print(f"wrote {path}")
    return 0
