"""Data sources: digits (scikit-learn, in memory), a folder of images, a Hugging Face `datasets` dataset.

Each builder makes a `TrainingData`: an index of the samples (data/index.py: no pixels decoded), their
buckets (data/buckets.py), the training and held-out validation positions, and the torch Dataset that
decodes them in DataLoader workers (data/samples.py). Bad images (unreadable, truncated, zero-byte, too
small for their bucket) are all reported at once: `data.on_bad_image=error` stops (exit 2) before anything
is written, `skip` trains without them and lists them in RUN_DIR/data/skipped.txt.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftrain.data.buckets import BucketPlan, plan_buckets
from difftrain.data.index import SampleIndex, index_hf, index_imagefolder
from difftrain.data.loader import BatchStream
from difftrain.data.order import BatchOrder, holdout
from difftrain.data.samples import Augment, ImageSamples, RowReader, TensorSamples, file_reader, unit_range
from difftrain.errors import UserError

SHOWN_PROBLEMS = 20


@dataclass
class TrainingData:
    """The samples of a run and how they are batched (built by the `data` registry targets below)."""

    samples: ImageSamples                 # the torch Dataset (positions 0..N-1 of `index`)
    index: SampleIndex
    plan: BucketPlan
    train: list[int]                      # positions trained on
    validation: list[int]                 # positions held out for the validation loss ([] = first training ones)
    random_flip: bool = False
    channels: int = 3
    fingerprint: str = ""                 # changes with the image files (part of the latent cache key)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train)

    @property
    def captions(self) -> list[str | None] | None:
        return self.index.captions

    @property
    def num_classes(self) -> int | None:
        return self.index.num_classes

    @property
    def names(self) -> list[str]:
        return self.index.names

    @property
    def validation_size(self) -> tuple[int, int]:
        """(h, w) of the most common training bucket: the size of validation images and sample grids."""
        counts = Counter(self.plan.bucket_of[p] for p in self.train)
        best = max(sorted(counts), key=lambda b: counts[b])
        return self.plan.buckets[best]

    def groups(self) -> list[list[int]]:
        """Training positions of each bucket, in index order."""
        members: list[list[int]] = [[] for _ in self.plan.buckets]
        for p in self.train:
            members[self.plan.bucket_of[p]].append(p)
        return members

    def order(self, batch_size: int, grad_accum: int, world_size: int, seed: int) -> BatchOrder:
        return BatchOrder(self.groups(), batch_size, grad_accum, world_size, seed)

    def stream(self, order: BatchOrder, rank: int, max_steps: int, num_workers: int, prefetch_factor: int,
               pin_memory: bool) -> BatchStream:
        return BatchStream(self.samples, order, rank, max_steps, num_workers, prefetch_factor, pin_memory)

    def validation_batch(self, count: int) -> dict:
        """The fixed samples of the validation loss: the held-out ones (or the first training ones), at the
        most common bucket's size, center-cropped, not flipped."""
        positions = (self.validation or self.train)[:count]
        batch = self.samples.fixed_batch(positions, self.validation_size)
        batch["pixels"] = unit_range(batch["pixels"])
        return batch

    def report(self) -> str:
        """Buckets with their counts, held-out and skipped samples (`difftrain data-report`)."""
        counts = Counter(self.plan.bucket_of[p] for p in self.train)
        lines = [f"{len(self.index)} samples usable: {len(self.train)} train, {len(self.validation)} validation; "
                 f"{len(self.skipped)} skipped", "bucket (h x w)   aspect   train samples"]
        for b, (h, w) in enumerate(self.plan.buckets):
            if counts.get(b):
                lines.append(f"{h:>5} x {w:<6}   {w / h:5.2f}   {counts[b]}")
        for name, reason in self.skipped[:SHOWN_PROBLEMS]:
            lines.append(f"skipped: {name}: {reason}")
        if len(self.skipped) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(self.skipped) - SHOWN_PROBLEMS} more skipped")
        return "\n".join(lines)

    def write_records(self, run_dir: Path) -> None:
        """RUN_DIR/data/: buckets.json, validation.txt (held-out samples), skipped.txt (bad images)."""
        folder = run_dir / "data"
        folder.mkdir(parents=True, exist_ok=True)
        counts = Counter(self.plan.bucket_of[p] for p in self.train)
        (folder / "buckets.json").write_text(json.dumps(
            [{"height": h, "width": w, "train_samples": counts.get(b, 0)} for b, (h, w) in enumerate(self.plan.buckets)],
            indent=1))
        (folder / "validation.txt").write_text("".join(f"{self.names[p]}\n" for p in self.validation))
        (folder / "skipped.txt").write_text("".join(f"{n}\t{r}\n" for n, r in self.skipped))


def _augment(options, interpolation) -> Augment:
    return Augment(getattr(options, "center_crop", True), options.random_flip, getattr(options, "caption_dropout", 0.0),
                   options.channels, interpolation)


def _finish(index: SampleIndex, options, seed: int, size_multiple: int, make_samples) -> TrainingData:
    """Buckets, bad-data policy, validation hold-out; `make_samples(index, plan, members)` builds the Dataset."""
    # default granularity: about resolution / 16 (64 px at 1024 for SD3/SDXL-sized models), a multiple of the model's
    step = options.bucket_step or size_multiple * max(1, options.resolution // 16 // size_multiple)
    buckets = options.buckets
    if isinstance(buckets, list):
        wrong = [b for b in buckets if b[0] % size_multiple or b[1] % size_multiple]
        if wrong:
            raise UserError(f"data.buckets {wrong[:3]} have sides that are not multiples of {size_multiple} (this "
                            "model's size multiple: latent downsampling x VAE factor); round them")
    elif step % size_multiple:
        raise UserError(f"data.bucket_step ({step}) must be a multiple of {size_multiple} for this model")
    plan = plan_buckets(index.sizes, buckets, options.resolution, step, options.max_upscale)
    problems = list(index.bad)
    for p in plan.too_small:
        h, w = index.sizes[p]
        bh, bw = plan.buckets[plan.bucket_of[p]]
        problems.append((index.names[p], f"too small: {h}x{w} would be upscaled more than data.max_upscale="
                                          f"{options.max_upscale} to its {bh}x{bw} bucket"))
    if problems and options.on_bad_image == "error":
        shown = "; ".join(f"{n} ({r})" for n, r in problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UserError(f"{len(problems)} of {len(index) + len(index.bad)} images cannot be trained on: {shown}{more}. "
                        "Fix or remove them, or set data.on_bad_image=skip to train without them (the list is "
                        "written to RUN_DIR/data/skipped.txt)")
    if plan.too_small:
        small = set(plan.too_small)
        keep = [i for i in range(len(index)) if i not in small]
        index = index.subset(keep)
        plan = BucketPlan(plan.buckets, [plan.bucket_of[i] for i in keep], [])
    if len(index) == 0:
        raise UserError("no image is left to train on after skipping the bad ones; fix the data")
    validation = holdout(len(index), options.validation_split, seed)
    held = set(validation)
    train = [p for p in range(len(index)) if p not in held]
    data = TrainingData(None, index, plan, train, validation, options.random_flip, options.channels,
                        index.fingerprint, problems)
    data.samples = make_samples(index, plan, data.groups())
    return data


def build_digits(options, interpolation, seed: int, size_multiple: int = 1, cache_folder=None) -> TrainingData:
    """scikit-learn's bundled UCI digits: 1,797 8x8 images with values 0..16 (no download), in memory.
    `options`: config/schema.py DigitsDataConfig."""
    from sklearn.datasets import load_digits

    from difftrain.data.transforms import resize_tensor

    resolution = options.resolution
    digits = load_digits(n_class=options.num_classes)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0, 1]
    if resolution != images.shape[-1]:
        images = resize_tensor(images, resolution, interpolation)
    images = images * 2.0 - 1.0
    n = len(images)
    index = SampleIndex(list(range(n)), [(resolution, resolution)] * n, [f"digit {i}" for i in range(n)], None,
                        digits.target.tolist(), options.num_classes)
    plan = BucketPlan([(resolution, resolution)], [0] * n, [])
    validation = holdout(n, options.validation_split, seed)
    held = set(validation)
    data = TrainingData(None, index, plan, [p for p in range(n) if p not in held], validation, options.random_flip,
                        options.channels, f"digits/{resolution}/{options.num_classes}")
    data.samples = TensorSamples(images, index, plan, _augment(options, interpolation), seed, data.groups())
    return data


def build_imagefolder(options, interpolation, seed: int, size_multiple: int = 1,
                      cache_folder: Path | None = None) -> TrainingData:
    """A folder of images, indexed from headers (the scan is cached in `cache_folder`) and decoded in workers.
    `options`: config/schema.py ImageFolderDataConfig."""
    index = index_imagefolder(options, cache_folder)
    augment = _augment(options, interpolation)
    return _finish(index, options, seed, size_multiple,
                   lambda ix, plan, members: ImageSamples(file_reader, ix, plan, augment, seed, members))


def build_hf(options, interpolation, seed: int, size_multiple: int = 1, cache_folder: Path | None = None) -> TrainingData:
    """A `datasets` dataset (a folder written by save_to_disk, a local folder load_dataset reads, or a hub id),
    kept as its memory-mapped Arrow table. `options`: config/schema_t2i.py HFDataConfig."""
    rows = _load_hf(options.dataset, options.config_name, options.split)
    if options.max_samples is not None:
        rows = rows.select(range(min(options.max_samples, len(rows))))
    index = index_hf(options, rows)
    reader = RowReader(rows, options.image_column)
    augment = _augment(options, interpolation)
    return _finish(index, options, seed, size_multiple,
                   lambda ix, plan, members: ImageSamples(reader, ix, plan, augment, seed, members))


def _load_hf(dataset: str, config_name: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise UserError("data=hf needs the `datasets` package: pip install 'difftrain[hf]' (or pip install "
                        "datasets), or use data=imagefolder with a metadata.jsonl") from None
    local = Path(dataset).expanduser()
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))  # written by save_to_disk
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"data.dataset '{dataset}' has the splits {', '.join(loaded)}, not "
                                    f"data.split='{split}'")
                loaded = loaded[split]
            return loaded
        if local.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(local), split=split)
        return datasets.load_dataset(dataset, config_name, split=split)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (datasets raises FileNotFoundError, DatasetNotFoundError, ...)
        raise UserError(f"could not load data.dataset='{dataset}' split '{split}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); give a folder written by save_to_disk, "
                        "a local image folder, or a reachable hub dataset id") from None
