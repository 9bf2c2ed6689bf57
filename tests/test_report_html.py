"""`difftrain report RUN_DIR|SWEEP_DIR` writes report.html: parsed (exact sections, every image a data: URI of
the run's own PNG, no external reference) and rendered in headless Chromium (no console error; the screenshot
holds the curve's stroke colour and every sample grid pixel for pixel)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

CURVE = (0x1F, 0x77, 0xB4)  # report_html.COLOURS[0]: the training loss line


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections, self.images, self.refs = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        self.refs += [v for k, v in attrs.items() if k in ("src", "href", "xlink:href", "data", "action") and v]
        assert tag not in ("script", "link", "iframe", "object"), tag


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from difftrain.engine.run import run_training

    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_training(tiny_config(run_dir, "trainer.validate_every=2", "logging.report_to=[]"))
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return run_dir


def _report(path: Path) -> None:
    from difftrain.cli.main import main

    assert main(["report", str(path)]) == 0


def test_run_report_is_one_self_contained_page(run_dir):
    _report(run_dir)
    text = (run_dir / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.sections == ["curves", "samples", "settings"]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000004.png"]
    assert [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images] == \
        [g.read_bytes() for g in grids]
    assert all(ref.startswith("data:image/png;base64,") for ref in page.refs)
    assert "://" not in text.replace(str(run_dir), "") and "url(" not in text and "@import" not in text
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert text.count("<polyline") == 1 and text.count("<circle") == 4  # loss line; val_loss, val_loss_ema dots
    assert f"{max(losses):.4g}" in text and "trainer.max_steps</td><td>4<" in text


def test_sweep_report_compares_every_run(run_dir, tmp_path):
    from difftrain.cli.sweep import COLUMNS

    for job, lr in ((0, "0.001"), (1, "0.002")):
        folder = tmp_path / "sweep" / str(job)
        folder.mkdir(parents=True)
        summary = {**json.loads((run_dir / "summary.json").read_text()), "run_dir": str(run_dir)}
        (folder / "job.json").write_text(json.dumps({"job": job, "overrides": [f"optimizer.lr={lr}"],
                                                     "status": "ok", "seconds": 1.0, "summary": summary}))
    _report(tmp_path / "sweep")
    page = _Page()
    page.feed((tmp_path / "sweep" / "report" / "report.html").read_text())
    assert page.sections == ["comparison", "curves", "samples"]
    last = (run_dir / "samples" / "step_000004.png").read_bytes()
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.images] == [last, last]
    text = (tmp_path / "sweep" / "report" / "report.html").read_text()
    assert text.count("<polyline") == 2 and "#0 optimizer.lr=0.001" in text and "#1 optimizer.lr=0.002" in text
    assert text.count("<th>") == len([c for c in COLUMNS if c not in ("run_dir", "error")])


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    return found


def _render(html_path: Path, png: Path) -> list[str]:
    """Screenshot the page in headless Chromium; returns its console messages (errors included)."""
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-color-profile=srgb", "--force-device-scale-factor=1", "--window-size=1100,1400",
                           "--enable-logging=stderr", "--v=0", f"--screenshot={png}", html_path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_chromium_reports_console_errors_of_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    messages = _render(broken, tmp_path / "broken.png")
    assert any("undefinedFunction is not defined" in m for m in messages), messages  # the check can fail


def test_run_report_renders_in_headless_chromium(run_dir, tmp_path):
    _report(run_dir)
    shot = tmp_path / "report.png"
    assert _render(run_dir / "report.html", shot) == []  # no console error or message at all
    screen = np.asarray(Image.open(shot).convert("RGB"))
    assert (screen == CURVE).all(axis=-1).sum() > 500  # the loss line is drawn (2.5 px wide)
    for grid in sorted((run_dir / "samples").glob("step_*.png")):
        pixels = np.asarray(Image.open(io.BytesIO(grid.read_bytes())).convert("RGB"))
        assert _find(screen, pixels), f"{grid.name} is not shown pixel for pixel"


def _find(screen: np.ndarray, tile: np.ndarray) -> bool:
    """Whether `tile` appears in `screen` exactly (anchored on its first non-white pixel)."""
    h, w, _ = tile.shape
    ys, xs = np.nonzero((tile != 255).any(axis=-1))
    ay, ax = ys[0], xs[0]
    for y, x in zip(*np.nonzero((screen == tile[ay, ax]).all(axis=-1))):
        top, left = y - ay, x - ax
        if top >= 0 and left >= 0 and top + h <= screen.shape[0] and left + w <= screen.shape[1] and \
                np.array_equal(screen[top:top + h, left:left + w], tile):
            return True
    return False
