"""Captions for image data: metadata.jsonl, .txt files, a fixed instance prompt.

Caption sources of `data=imagefolder`, in order:
1. `data.instance_prompt` set: that prompt for every image (DreamBooth style); files are not read.
2. a `metadata.jsonl` in the image's folder (or any folder above it, up to data.path) with a row
   {"file_name": <path relative to that metadata.jsonl>, "text": <caption>} (`data.caption_column` names
   the caption field), as Hugging Face's imagefolder reads it;
3. a `.txt` file beside the image with the same stem (`dog1.png` -> `dog1.txt`).
Images without a caption are listed in one error when a text-to-image model trains on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from difftrain.errors import UserError


def _metadata(folder: Path, caption_column: str) -> dict[Path, str]:
    path = folder / "metadata.jsonl"
    out: dict[Path, str] = {}
    if not path.is_file():
        return out
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc}); each line must be an object such "
                            'as {"file_name": "a.png", "text": "a photo of a dog"}') from None
        if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
            raise UserError(f"{path} line {number} needs the keys 'file_name' and '{caption_column}' "
                            "(data.caption_column names the caption key)")
        text = row[caption_column]
        if not isinstance(text, str):
            raise UserError(f"{path} line {number}: the caption '{caption_column}' must be a string, got "
                            f"{type(text).__name__}")
        out[(folder / row["file_name"]).resolve()] = text
    return out


def read_captions(root: Path, files: list[Path], caption_column: str = "text",
                  instance_prompt: str | None = None) -> list[str | None] | None:
    """One caption per file (None where a file has none); None when no file has a caption at all."""
    if instance_prompt is not None:
        return [instance_prompt] * len(files)
    root = root.resolve()
    table: dict[Path, str] = {}
    folders = {root}
    for file in files:
        folder = file.resolve().parent
        while folder != root and root in folder.parents:
            folders.add(folder)
            folder = folder.parent
    for folder in sorted(folders, key=lambda p: len(p.parts)):  # deeper metadata.jsonl files win
        table.update(_metadata(folder, caption_column))
    captions: list[str | None] = []
    for file in files:
        text = table.get(file.resolve())
        if text is None and file.with_suffix(".txt").is_file():
            text = file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        captions.append(text)
    return captions if any(c is not None for c in captions) else None


def require_captions(data, names: list[str] | None = None) -> list[str]:
    """The captions of a dataset, or one UserError naming the images that have none."""
    captions = getattr(data, "captions", None)
    if captions is None:
        raise UserError("the training images have no captions: add a metadata.jsonl (one line per image: "
                        '{"file_name": "a.png", "text": "a photo of ..."}), a .txt file beside each image, '
                        "or set data.instance_prompt='a photo of sks dog'")
    missing = [i for i, c in enumerate(captions) if c is None]
    if missing:
        shown = ", ".join(names[i] if names else str(i) for i in missing[:5])
        raise UserError(f"{len(missing)} of {len(captions)} images have no caption (e.g. {shown}); add them to "
                        "metadata.jsonl or as .txt files, or set data.instance_prompt")
    return captions
