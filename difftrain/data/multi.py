"""Several sources in one run (data=sources), and what every captioned source has: caption rules, repeats,
masks and DreamBooth class images (docs/recipes.md).

Each source is indexed on its own (data/index.py) and planned into buckets with its own resolution and
bucket setting; the indexes are concatenated (instance sources first, then the class-image folders of
prior preservation), the bucket lists merged (one bucket per distinct size). The replayable order
(data/order.py) then mixes the sources' samples within each bucket, `repeats` times each per epoch, and
pairs every sample of a source with prior preservation with one class image. `data=imagefolder` and
`data=hf` go through the same assembly as one source, and with the defaults nothing in their order changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from difftrain.config.schema_data import SOURCE_KINDS
from difftrain.data.buckets import BucketPlan, plan_buckets
from difftrain.data.cache import digest
from difftrain.data.caption_rules import rules_of
from difftrain.data.index import SampleIndex
from difftrain.data.masks import SourceTable, mask_problems
from difftrain.data.order import Mixing
from difftrain.errors import UserError


@dataclass
class Part:
    """One indexed source: its options (an ImageFolderDataConfig/HFDataConfig), label, reader of its keys."""

    index: SampleIndex
    options: object
    name: str
    reader: object
    is_class: bool = False
    prior_of: int | None = None       # class-image parts: the instance part they preserve


class PartReader:
    """Opens (part, key) with that part's reader (keys of several sources in one Dataset; picklable)."""

    def __init__(self, readers: list) -> None:
        self.readers = readers

    def __call__(self, key):
        part, inner = key
        return self.readers[part](inner)


def bucket_step(options, size_multiple: int) -> int:
    """data.bucket_step, or about resolution / 16 rounded to the model's size multiple (64 px at 1024)."""
    return options.bucket_step or size_multiple * max(1, options.resolution // 16 // size_multiple)


def plan_part(index: SampleIndex, options, size_multiple: int) -> BucketPlan:
    step, buckets = bucket_step(options, size_multiple), options.buckets
    if isinstance(buckets, list):
        wrong = [b for b in buckets if b[0] % size_multiple or b[1] % size_multiple]
        if wrong:
            raise UserError(f"data.buckets {wrong[:3]} have sides that are not multiples of {size_multiple} (this "
                            "model's size multiple: latent downsampling x VAE factor); round them")
    elif step % size_multiple:
        raise UserError(f"data.bucket_step ({step}) must be a multiple of {size_multiple} for this model")
    return plan_buckets(index.sizes, buckets, options.resolution, step, options.max_upscale)


def concatenate(parts: list[Part], size_multiple: int):
    """(index, plan, table, reader) of all parts; a single part keeps its own keys, names and reader."""
    single = len(parts) == 1
    buckets: list[tuple[int, int]] = []
    keys, sizes, names, captions, bucket_of, too_small, bad, source_of = [], [], [], [], [], [], [], []
    any_captions = False
    for number, part in enumerate(parts):
        index, options = part.index, part.options
        plan = plan_part(index, options, size_multiple)
        mapping = []
        for size in plan.buckets:
            if tuple(size) not in buckets:
                buckets.append(tuple(size))
            mapping.append(buckets.index(tuple(size)))
        offset = len(keys)
        label = "" if single else f"{part.name}/"
        rules = rules_of(options)
        keys += index.keys if single else [(number, k) for k in index.keys]
        sizes += index.sizes
        names += [label + n for n in index.names]
        any_captions = any_captions or index.captions is not None
        captions += [rules.fixed(c) for c in (index.captions or [None] * len(index))]
        bucket_of += [mapping[b] for b in plan.bucket_of]
        too_small += [offset + p for p in plan.too_small]
        bad += [(label + n, r) for n, r in index.bad]
        if getattr(options, "masks", "none") == "files":
            bad += [(label + n, r) for n, r in mask_problems(index.keys, index.names, index.sizes)]
        source_of += [number] * len(index)
    first = parts[0].index
    merged = SampleIndex(keys, sizes, names, captions if any_captions else None,
                         first.labels if single else None, first.num_classes if single else None, bad,
                         first.fingerprint if single else digest([p.index.fingerprint for p in parts]))
    table = SourceTable([p.name for p in parts], source_of, [rules_of(p.options) for p in parts],
                        [getattr(p.options, "masks", "none") for p in parts],
                        [getattr(p.options, "unmasked_weight", 0.0) for p in parts], [p.is_class for p in parts],
                        [parts[p.prior_of].options.prior_loss_weight if p.is_class else 1.0 for p in parts])
    reader = parts[0].reader if single else PartReader([p.reader for p in parts])
    return merged, BucketPlan(buckets, bucket_of, too_small), table, reader


def mixing_of(table: SourceTable, parts: list[Part], train: list[int], n: int) -> Mixing | None:
    """The repeats and class-image pools of the order; None when every source is seen once and none has a
    prior (the order is then exactly the plain one)."""
    repeats = [float(getattr(parts[s].options, "repeats", 1.0)) for s in table.source_of]
    if all(r == 1.0 for r in repeats) and not table.any_prior:
        return None
    pools, pool_of_part = [], {}
    for number, part in enumerate(parts):
        if part.is_class:
            pool_of_part[part.prior_of] = len(pools)
            pools.append([p for p in range(n) if table.source_of[p] == number])
    prior_pool = [pool_of_part.get(table.source_of[p]) for p in range(n)]
    return Mixing(n, repeats, prior_pool, pools)


# ---- data=sources --------------------------------------------------------------------------------------
def entry_options(options, entry: dict, number: int):
    """The ImageFolderDataConfig / HFDataConfig of one data.sources entry: the top-level keys as defaults,
    the entry's own keys over them (the config rules already checked both)."""
    from difftrain.config.schema_data import ImageFolderDataConfig
    from difftrain.config.schema_t2i import HFDataConfig

    entry = dict(entry)
    kind = entry.pop("kind", "imagefolder")
    label = entry.pop("name", None)
    if kind not in SOURCE_KINDS:
        raise UserError(f"data.sources[{number}].kind='{kind}' must be one of {', '.join(SOURCE_KINDS)}")
    cls = ImageFolderDataConfig if kind == "imagefolder" else HFDataConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    merged = {k: v for k, v in dataclasses.asdict(options).items()
              if k in fields and k not in ("name", "sources")}
    merged.update(entry)
    merged["name"] = kind
    built = cls(**merged)
    if label is None:
        label = Path(built.path).name if kind == "imagefolder" else Path(str(built.dataset)).name
    return built, str(label or f"source{number}")


def build_sources(options, interpolation, seed: int, size_multiple: int = 1, cache_folder: Path | None = None):
    """data=sources (config/schema_data.py SourcesDataConfig): each entry indexed, the parts assembled."""
    from difftrain.data.sources import assemble, instance_parts

    if not options.sources:
        raise UserError("data=sources needs a list in data.sources, e.g. data.sources='[{path: ./photos}, "
                        "{path: ./style, repeats: 2}]'")
    entries = [entry_options(options, e, i) for i, e in enumerate(options.sources)]
    labels = [label for _, label in entries]
    if len(set(labels)) != len(labels):
        raise UserError(f"data.sources have the same name twice ({', '.join(labels)}); give each entry a "
                        "distinct `name`")
    parts = instance_parts(entries, cache_folder)
    return assemble(parts, options, seed, size_multiple, interpolation)

