"""report.html: one static page per run or sweep, everything inline (no script, no CDN, no server).

A run's page (RUN_DIR/report.html) has three sections: `curves` (training loss as a line, validation losses
as dots, inline SVG drawn here), `samples` (every validation grid of RUN_DIR/samples/, oldest first, as base64
PNGs) and `settings` (the resolved config.yaml as a table). A sweep's page (SWEEP_DIR/report/report.html) has
`comparison` (the table of runs.csv), `curves` (one colour per run) and `samples` (the last grid of each run).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
figure{display:inline-block;margin:0 16px 16px 0;vertical-align:top}figcaption{font-size:13px;color:#555}
img{image-rendering:pixelated;display:block}svg text{font-size:11px;fill:#444}"""


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flatten(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in node.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def svg_chart(series: list[dict], width: int = 720, height: int = 320, log_y: bool = True) -> str:
    """A line/dot chart: each series {label, colour, points [(x, y)], dots: bool}; log y when all y > 0."""
    points = [p for s in series for p in s["points"]]
    if not points:
        return "<p>no metrics logged</p>"
    log_y = log_y and all(y > 0 for _, y in points)
    fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(fy(y) for _, y in points), max(fy(y) for _, y in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    left, right, top, bottom = 60, 170, 12, 32
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    sy = lambda y: top + (y1 - fy(y)) / (y1 - y0) * (height - top - bottom)
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#bbb"/>']
    for value, anchor in ((y1, "top"), (y0, "bottom")):
        shown = 10 ** value if log_y else value
        y = top + 10 if anchor == "top" else height - bottom
        parts.append(f'<text x="{left - 6}" y="{y}" text-anchor="end">{shown:.4g}</text>')
    for value in (x0, x1):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 16}" text-anchor="middle">{value:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle">'
                 'optimizer step</text>')
    for i, s in enumerate(series):
        xy = [(sx(x), sy(y)) for x, y in s["points"]]
        if s.get("dots"):
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{s["colour"]}"/>' for x, y in xy]
        else:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s["colour"]}" stroke-width="2.5"/>')
        ly = top + 14 + 18 * i
        parts.append(f'<rect x="{width - right + 10}" y="{ly - 9}" width="12" height="12" fill="{s["colour"]}"/>'
                     f'<text x="{width - right + 28}" y="{ly + 1}">{html.escape(s["label"][:26])}</text>')
    return "".join(parts) + "</svg>"


def run_series(lines: list[dict], label: str = "", colour: str = COLOURS[0]) -> list[dict]:
    """The loss line and the validation-loss dots of one run's metrics."""
    out = [{"label": f"{label} loss".strip(), "colour": colour,
            "points": [(m["step"], m["loss"]) for m in lines if m.get("loss") is not None]}]
    for key, shade in (("val_loss", COLOURS[1]), ("val_loss_ema", COLOURS[2])):
        pts = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
        if pts:
            out.append({"label": f"{label} {key}".strip(), "colour": shade if not label else colour,
                        "points": pts, "dots": True})
    return out


def image_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(png: Path, caption: str) -> str:
    return f"<figure>{image_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    body = "".join(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{content}</section>'
                   for sid, heading, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def grids(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "samples").glob("step_*.png"))


def write_run_report(run_dir: Path) -> Path:
    import yaml

    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    settings = _table(["key", "value"], [[k, json.dumps(v) if isinstance(v, list) else v]
                                         for k, v in _flatten(config or {})])
    pictures = "".join(_figure(p, f"step {int(p.stem.split('_')[1])}") for p in grids(run_dir))
    page = _page(f"difftrain run {run_dir.name}", [
        ("curves", "Loss and validation curves", svg_chart(run_series(metrics(run_dir)))),
        ("samples", "Sample grids over steps", pictures or "<p>no sample grids</p>"),
        ("settings", "Settings (the resolved config.yaml)", settings)])
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def write_sweep_report(sweep_dir: Path, rows: list[dict], columns: tuple[str, ...], out: Path) -> Path:
    """`rows`: difftrain.cli.sweep.collect(sweep_dir); `columns`: the runs.csv columns shown."""
    shown = [c for c in columns if c not in ("run_dir", "error")]
    table = _table(shown, [[row.get(c) for c in shown] for row in rows])
    series, pictures = [], []
    for i, row in enumerate(rows):
        run_dir, label = Path(row["run_dir"]), f"#{row['job']} {row['overrides']}".strip()
        line = run_series(metrics(run_dir), label, COLOURS[i % len(COLOURS)])
        series += line if line[0]["points"] else []
        last = grids(run_dir)
        if last:
            pictures.append(_figure(last[-1], f"{label} (step {int(last[-1].stem.split('_')[1])})"))
    page = _page(f"difftrain sweep {sweep_dir.name}", [
        ("comparison", "Comparison", table),
        ("curves", "Loss curves (dots: validation loss)", svg_chart(series)),
        ("samples", "Last sample grid of each run", "".join(pictures) or "<p>no sample grids</p>")])
    out.write_text(page, encoding="utf-8")
    return out
