"""Sources as indexes: what each sample is (a file or a dataset row), its size, caption and label, learned
without decoding pixels, plus the list of files that cannot be trained on.

An image folder is indexed from image headers (PIL reads a few hundred bytes per file) and a cheap
truncation check (a JPEG ends with its EOI marker, a PNG with its IEND chunk); a `datasets` dataset from the
encoded bytes of its image column (Arrow, memory-mapped: nothing is decoded). The scan of a folder is cached
as `index-<key>.json` in the cache folder, keyed by every file's name, size and mtime, so a second run over
20,000 images costs one `stat` per file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from difftrain.data.cache import digest
from difftrain.errors import UserError
from difftrain.progress import phase

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
INDEX_VERSION = 1
EXIF_ORIENTATION = 0x0112  # values 5..8 rotate by 90 degrees: width and height swap


@dataclass
class SampleIndex:
    """One entry per sample: `keys` (file path or dataset row), `sizes` ((height, width) after EXIF
    rotation), `captions` (None = none at all), `labels` (None = no class folders); `bad` lists every
    sample that cannot be read, as (name, reason)."""

    keys: list
    sizes: list[tuple[int, int]]
    names: list[str]                     # what a report shows: the path relative to data.path, or "row N"
    captions: list[str | None] | None = None
    labels: list[int] | None = None
    num_classes: int | None = None
    bad: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""                # changes whenever a file's name, size or mtime (or the dataset) does

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keep: list[int]) -> SampleIndex:
        pick = (lambda values: None if values is None else [values[i] for i in keep])
        return SampleIndex([self.keys[i] for i in keep], [self.sizes[i] for i in keep],
                           [self.names[i] for i in keep], pick(self.captions), pick(self.labels),
                           self.num_classes, list(self.bad), self.fingerprint)


def header_size(fp) -> tuple[int, int]:
    """(height, width) as displayed (EXIF rotation applied) from the image header only."""
    from PIL import Image

    with Image.open(fp) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 (a broken EXIF block is not a broken image)
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def truncation_problem(head: bytes, tail: bytes) -> str | None:
    """A reason when a JPEG or PNG stops before its end marker (the common result of an interrupted copy)."""
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG") and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def inspect_file(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) of a readable image, or (None, reason)."""
    try:
        size = path.stat().st_size
        if size == 0:
            return None, "zero-byte file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 64))
            problem = truncation_problem(head, f.read())
            if problem:
                return None, problem
            f.seek(0)
            return header_size(f), None
    except Exception as exc:  # noqa: BLE001 (PIL raises UnidentifiedImageError, OSError, SyntaxError, ...)
        return None, unreadable(exc)


def unreadable(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "unreadable: not an image format PIL can open"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"unreadable ({type(exc).__name__}: {text[:120]})"


def list_images(root: Path) -> list[tuple[Path, str | None]]:
    """(file, class folder or None) of every image under `root`, in a fixed (sorted) order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, str | None]] = []
    for cls in classes:
        for dirpath, dirnames, names in os.walk(root / cls):
            dirnames.sort()
            files += [(Path(dirpath) / n, cls) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    files += [(p, None) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return [(f, c) for f, c in files if not f.name.startswith(".")]


def _scan(root: Path, files: list[Path], cache_folder: Path | None) -> tuple[list, dict[str, str], str]:
    """(sizes, bad reasons by name, key) of every file: from the index cache when names, sizes and mtimes match."""
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f.relative_to(root).as_posix(), -1, -1))
    key = digest({"version": INDEX_VERSION, "root": str(root.resolve()), "files": stats})
    cached = cache_folder / f"index-{key[:20]}.json" if cache_folder is not None else None
    if cached is not None and cached.is_file():
        try:
            saved = json.loads(cached.read_text())
            if saved.get("key") == key:
                return [tuple(s) if s else None for s in saved["sizes"]], saved["bad"], key
        except (OSError, ValueError, KeyError):
            pass  # a damaged index file is rebuilt
    sizes, bad = [], {}
    with phase("index", len(files), "files") as tick:  # only a scan that reads headers shows (not a cached one)
        for f, (name, _, _) in zip(files, stats):
            size, problem = inspect_file(f)
            sizes.append(size)
            if problem:
                bad[name] = problem
            tick()
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "sizes": sizes, "bad": bad}))
            os.replace(tmp, cached)
        except OSError:
            pass  # an unwritable cache folder only costs the next run a rescan
    return sizes, bad, key


def index_imagefolder(options, cache_folder: Path | None) -> SampleIndex:
    """Every image of `options.path` (ImageFolderDataConfig): sizes from headers, labels from class folders,
    captions (data/captions.py). Unreadable files are listed in `bad`, not raised."""
    from difftrain.data.captions import read_captions

    path = options.path
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path '{path}' is not a folder: point data.path at a folder of images "
                        "(optionally one subfolder per class)")
    listed = list_images(root)
    if getattr(options, "masks", "none") == "files":  # <stem>_mask.png files are masks, not training images
        from difftrain.data.masks import is_mask_file

        listed = [(f, c) for f, c in listed if not is_mask_file(f)]
    if not listed:
        raise UserError(f"data.path '{path}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "add images or fix data.path")
    class_names = sorted({c for _, c in listed if c is not None})
    if class_names and any(c is None for _, c in listed):
        raise UserError(f"data.path '{path}' mixes class subfolders with loose images; "
                        "move the loose images into a class subfolder")
    files = [f for f, _ in listed]
    sizes, bad, key = _scan(root, files, cache_folder)
    names = [f.relative_to(root).as_posix() for f in files]
    labels, num_classes = None, None
    if class_names:
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = [lookup[c] for _, c in listed]
        num_classes = options.num_classes or len(class_names)
        if len(class_names) > num_classes:
            raise UserError(f"data.path has {len(class_names)} class folders but data.num_classes={num_classes}; "
                            "raise data.num_classes or remove folders")
    captions = read_captions(root, files, options.caption_column, options.instance_prompt)
    index = SampleIndex([str(f) for f in files], sizes, names, captions, labels, num_classes, fingerprint=key)
    return _without_bad(index, [(n, bad[n]) for n in names if n in bad])


def index_hf(options, rows) -> SampleIndex:
    """Every row of a `datasets` dataset (already cut to data.max_samples) (HFDataConfig): sizes from the encoded image bytes (decode=False),
    captions from the caption column (or the instance prompt)."""
    import datasets

    image_column, caption_column, instance_prompt = options.image_column, options.caption_column, \
        options.instance_prompt
    for column in (image_column, caption_column if instance_prompt is None else None):
        if column is not None and column not in rows.column_names:
            raise UserError(f"data.dataset '{options.dataset}' has no column '{column}'; its columns are "
                            f"{', '.join(rows.column_names)} (set data.image_column / data.caption_column)")
    if len(rows) == 0:
        raise UserError(f"data.dataset '{options.dataset}' split '{options.split}' has no rows")
    if not isinstance(rows.features[image_column], datasets.Image):
        raise UserError(f"data.image_column '{image_column}' of '{options.dataset}' holds "
                        f"{type(rows.features[image_column]).__name__}, not images; name the column with the images")
    encoded = rows.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    sizes, bad, names = [], [], []
    for chunk in encoded.iter(batch_size=256):  # a chunk of encoded bytes at a time, never the whole column
        for cell in chunk[image_column]:
            names.append(f"row {len(names)}")
            size, problem = encoded_size(cell)
            sizes.append(size)
            if problem:
                bad.append((names[-1], problem))
    if instance_prompt is not None:
        captions = [instance_prompt] * len(rows)
    else:
        captions = rows[caption_column]
        for i, text in enumerate(captions):
            if not isinstance(text, str):
                raise UserError(f"row {i} of '{options.dataset}': the caption column '{caption_column}' must hold "
                                f"strings, got {type(text).__name__}")
    fingerprint = f"{getattr(rows, '_fingerprint', options.dataset)}/{image_column}/{len(rows)}"
    return _without_bad(SampleIndex(list(range(len(rows))), sizes, names, captions, fingerprint=fingerprint), bad)


def encoded_size(cell) -> tuple[tuple[int, int] | None, str | None]:
    """Size of one undecoded `datasets` Image cell ({"bytes", "path"})."""
    data = (cell or {}).get("bytes")
    try:
        if data is None:
            path = (cell or {}).get("path")
            return (None, "no image") if not path else inspect_file(Path(path))
        if not data:
            return None, "zero-byte image"
        problem = truncation_problem(data[:16], data[-64:])
        return (None, problem) if problem else (header_size(io.BytesIO(data)), None)
    except Exception as exc:  # noqa: BLE001
        return None, unreadable(exc)


def _without_bad(index: SampleIndex, bad: list[tuple[str, str]]) -> SampleIndex:
    """The readable samples; `bad` keeps the rest for the report (data.on_bad_image decides what happens)."""
    if not bad:
        return index
    bad_names = {n for n, _ in bad}
    keep = [i for i, n in enumerate(index.names) if n not in bad_names]
    out = index.subset(keep)
    out.bad = bad
    return out
