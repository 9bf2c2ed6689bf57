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

from difftrain.data.buckets import BucketPlan
from difftrain.data.index import SampleIndex, index_hf, index_imagefolder
from difftrain.data.loader import BatchStream
from difftrain.data.masks import SourceTable
from difftrain.data.multi import Part, concatenate, mixing_of
from difftrain.data.order import BatchOrder, Mixing, holdout
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
    table: SourceTable | None = None      # the source of every position and its options (data/masks.py)
    mixing: Mixing | None = None          # repeats and class-image pools of the order (None: plain order)

    @property
    def source_names(self) -> list[str]:
        return [n for n, c in zip(self.table.names, self.table.is_class) if not c] if self.table else []

    @property
    def has_prior(self) -> bool:
        return self.table is not None and self.table.any_prior

    @property
    def random_captions(self) -> bool:
        """Whether a caption changes from epoch to epoch (tag shuffling or dropout): no prompt cache then."""
        return self.table is not None and any(r.random_tags for r in self.table.rules)

    def sources_of_slots(self, slots) -> list[int]:
        n = len(self.index)
        return [self.table.source_of[int(s) % n] for s in slots]

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
        for p in self.train:  # (class images of prior preservation are never in `train`)
            members[self.plan.bucket_of[p]].append(p)
        return members

    def order(self, batch_size: int, grad_accum: int, world_size: int, seed: int) -> BatchOrder:
        return BatchOrder(self.groups(), batch_size, grad_accum, world_size, seed, self.mixing)

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
        lines += self.source_lines()
        for name, reason in self.skipped[:SHOWN_PROBLEMS]:
            lines.append(f"skipped: {name}: {reason}")
        if len(self.skipped) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(self.skipped) - SHOWN_PROBLEMS} more skipped")
        return "\n".join(lines)

    def source_lines(self) -> list[str]:
        """One line per source when there are several (or class images): images, repeats, per epoch."""
        table = self.table
        if table is None or (len(table.names) == 1 and not table.any_prior):
            return []
        counts = Counter(table.source_of[p] for p in self.train)
        order_counts = Counter()
        if self.mixing is not None:
            for p in self.train:
                order_counts[table.source_of[p]] += self.mixing.repeats[p]
        lines = ["source           images   per epoch   captions"]
        for s, name in enumerate(table.names):
            rules = table.rules[s]
            if table.is_class[s]:
                n = sum(1 for x in table.source_of if x == s)
                lines.append(f"{name:<16} {n:>6}   paired      class images (prior_loss_weight {table.prior_weight[s]})")
                continue
            per_epoch = round(order_counts[s]) if self.mixing is not None else counts[s]
            notes = [k for k, on in (("prefix", rules.prefix), ("suffix", rules.suffix),
                                     ("shuffled tags", rules.shuffle_tags), ("tag dropout", rules.tag_dropout),
                                     (f"masks={table.masks[s]}", table.masks[s] != "none")) if on]
            lines.append(f"{name:<16} {counts[s]:>6}   {per_epoch:>9}   {', '.join(notes) or '-'}")
        return lines

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


def assemble(parts: list[Part], options, seed: int, size_multiple: int, interpolation) -> TrainingData:
    """Buckets, bad-data policy, validation hold-out and the Dataset of one or more indexed sources (data/multi.py)."""
    index, plan, table, reader = concatenate(parts, size_multiple)
    problems = list(index.bad)
    for p in plan.too_small:
        h, w = index.sizes[p]
        bh, bw = plan.buckets[plan.bucket_of[p]]
        problems.append((index.names[p], f"too small: {h}x{w} would be upscaled more than data.max_upscale="
                                          f"{options.max_upscale} to its {bh}x{bw} bucket"))
    if problems and options.on_bad_image == "error":
        shown = "; ".join(f"{n} ({r})" for n, r in problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        listed = set(index.names)  # (an image with a bad mask is listed in `bad` but still in the index)
        total = len(index) + sum(1 for n, _ in index.bad if n not in listed)
        raise UserError(f"{len(problems)} of {total} images cannot be trained on: {shown}{more}. "
                        "Fix or remove them, or set data.on_bad_image=skip to train without them (the list is "
                        "written to RUN_DIR/data/skipped.txt)")
    bad_names = {n for n, _ in index.bad}
    drop = set(plan.too_small) | {i for i, n in enumerate(index.names) if n in bad_names}
    if drop:  # (mask problems are listed in `bad` but their images are still in the index)
        keep = [i for i in range(len(index)) if i not in drop]
        index = index.subset(keep)
        plan = BucketPlan(plan.buckets, [plan.bucket_of[i] for i in keep], [])
        table = table.subset(keep)
    if len(index) == 0:
        raise UserError("no image is left to train on after skipping the bad ones; fix the data")
    instances = [p for p in range(len(index)) if not table.is_class[table.source_of[p]]]
    validation = [instances[i] for i in holdout(len(instances), options.validation_split, seed)]
    held = set(validation)
    train = [p for p in instances if p not in held]
    data = TrainingData(None, index, plan, train, validation, options.random_flip, options.channels,
                        index.fingerprint, problems, table, mixing_of(table, parts, train, len(index)))
    augment = _augment(options, interpolation)
    data.samples = ImageSamples(reader, index, plan, augment, seed, data.groups(), table)
    return data


def instance_parts(entries: list[tuple[object, str]], cache_folder: Path | None) -> list[Part]:
    """The indexed parts of (source options, label) entries: the sources, then their class-image folders."""
    parts = []
    for options, label in entries:
        if options.name == "hf":
            rows = _load_hf(options.dataset, options.config_name, options.split)
            if options.max_samples is not None:
                rows = rows.select(range(min(options.max_samples, len(rows))))
            parts.append(Part(index_hf(options, rows), options, label, RowReader(rows, options.image_column)))
        else:
            parts.append(Part(index_imagefolder(options, cache_folder), options, label, file_reader))
    for number, (options, label) in enumerate(entries):
        if getattr(options, "with_prior_preservation", False):
            parts.append(class_part(options, label, number, cache_folder))
    return parts


def class_part(options, label: str, number: int, cache_folder: Path | None) -> Part:
    """The class images of a source with prior preservation (engine/class_images.py generated the missing
    ones before the data was built): the first num_class_images of class_data_dir, captioned class_prompt."""
    from difftrain.config.schema_data import ImageFolderDataConfig

    folder = ImageFolderDataConfig(path=options.class_data_dir, resolution=options.resolution, buckets=options.buckets,
                                   bucket_step=options.bucket_step, max_upscale=options.max_upscale,
                                   instance_prompt=options.class_prompt, center_crop=options.center_crop)
    index = index_imagefolder(folder, cache_folder)
    if len(index) < options.num_class_images:
        raise UserError(f"data.class_data_dir '{options.class_data_dir}' holds {len(index)} usable images, fewer "
                        f"than data.num_class_images={options.num_class_images}; let difftrain generate the rest "
                        "(it does before training when the folder is writable) or lower num_class_images")
    index = index.subset(list(range(options.num_class_images)))
    return Part(index, folder, f"{label}-class", file_reader, is_class=True, prior_of=number)


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
    `options`: config/schema.py ImageFolderDataConfig (also data=dreambooth)."""
    return assemble(instance_parts([(options, "data")], cache_folder), options, seed, size_multiple, interpolation)


def build_hf(options, interpolation, seed: int, size_multiple: int = 1, cache_folder: Path | None = None) -> TrainingData:
    """A `datasets` dataset (a folder written by save_to_disk, a local folder load_dataset reads, or a hub id),
    kept as its memory-mapped Arrow table. `options`: config/schema_t2i.py HFDataConfig."""
    return assemble(instance_parts([(options, "data")], cache_folder), options, seed, size_multiple, interpolation)


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
