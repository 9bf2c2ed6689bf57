"""Folders of mixed-aspect images for the data tests (written in code, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

SIZES = [(40, 30), (30, 40), (32, 32), (48, 24), (24, 48), (36, 36), (44, 33), (33, 44)]  # (height, width)


def write_mixed(folder: Path, n: int = 16, sizes=SIZES, fmt: str = "png", captions: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        name = f"im{i:03d}.{fmt}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": f"picture {i % 3}"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
