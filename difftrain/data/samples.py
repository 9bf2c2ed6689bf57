"""The samples of a run as a torch Dataset: decoded (or read from a cache) in DataLoader workers.

A micro-batch is asked for by one `MicroBatchKey` (data/loader.py's batch sampler yields them) and built by
`__getitems__`. Every random draw of a sample (crop offset, flip, caption dropout) comes from a generator
seeded with (seed, epoch, sample position), so the batch is the same whichever worker builds it, and every
epoch draws a new crop and flip. A file that cannot be decoded mid-run is replaced by the next sample of
its bucket (the same replacement in a resumed run) and reported once per worker.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import torch

from difftrain.components.seeding import seed_for
from difftrain.data.buckets import center_offset, cover
from difftrain.data.caption_rules import CaptionRules
from difftrain.data.masks import SourceTable, open_mask
from difftrain.errors import UserError


@dataclass(frozen=True)
class MicroBatchKey:
    step: int
    micro: int
    epoch: int
    positions: tuple[int, ...]           # slots: position + copy * num_positions (data/order.py Mixing)
    prior: tuple[int, ...] = ()          # DreamBooth class-image positions paired with this batch


@dataclass(frozen=True)
class Augment:
    """Per-sample options of the transform (the data config's, resolved)."""

    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    channels: int = 3
    interpolation: object = None     # a torchvision InterpolationMode (the `interpolation` component)


@dataclass
class Served:
    """What the caches serve instead of decoding and encoding (data/cache.py readers), set by the family.
    An entry a lazily filled cache lacks yet is handed to the step to encode (`Loaded.entry`)."""

    latents: object | None = None    # EntryReader: entry latent_entry(position, flip) -> "mean_logvar"
    flips: bool = False              # the latent cache keeps each sample's mirror image as its own entry
    text: object | None = None       # EntryReader of embedding rows (one per distinct caption)
    caption_rows: list[int] = field(default_factory=list)
    empty_row: int = 0

    def latent_entry(self, position: int, flip: bool) -> int:
        return 2 * position + int(flip) if self.flips else position


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (float pixels, the in-memory digits, are already there)."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


def draws(seed: int, epoch: int, position: int, augment: Augment, crop_room: tuple[int, int],
          rules: CaptionRules | None = None, copy: int = 0):
    """(top, left, flip, dropped, generator) of one sample (copy `copy` of a repeated one) in one epoch; a fixed
    draw order; the generator goes on to draw the caption's tags (None when nothing is random)."""
    top = left = 0
    dropout = rules.caption_dropout if rules is not None else augment.caption_dropout
    random_tags = rules is not None and rules.random_tags
    if augment.center_crop and not augment.random_flip and not dropout and not random_tags:
        return top, left, False, False, None  # nothing random: no generator to seed
    name = f"sample/{epoch}/{position}" if copy == 0 else f"sample/{epoch}/{position}/{copy}"
    g = torch.Generator().manual_seed(seed_for(seed, 0, name))
    if not augment.center_crop:
        top = int(torch.randint(0, crop_room[0] + 1, (1,), generator=g))
        left = int(torch.randint(0, crop_room[1] + 1, (1,), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5) if augment.random_flip else False
    dropped = bool(torch.rand((), generator=g) < dropout) if dropout else False
    return top, left, flip, dropped, g


@dataclass
class Loaded:
    """One sample of a micro-batch as a worker read it."""

    position: int
    tensor: torch.Tensor            # uint8 pixels, or cached latent parameters
    crop: tuple[int, int]
    flip: bool
    dropped: bool
    caption: str | None
    mask: torch.Tensor | None = None
    entry: int | None = None        # the latent cache entry the step must encode `tensor` (pixels) for


class ImageSamples(torch.utils.data.Dataset):
    """Images read by `reader(key)` (a PIL image) at their bucket's size; captions, labels, cached rows."""

    def __init__(self, reader, index, plan, augment: Augment, seed: int, members: list[list[int]],
                 table: SourceTable | None = None) -> None:
        self.reader, self.keys, self.sizes = reader, index.keys, index.sizes
        self.table = table or SourceTable.single(len(index.keys), CaptionRules(caption_dropout=augment.caption_dropout))
        self.captions, self.labels, self.names = index.captions, index.labels, index.names
        self.buckets, self.bucket_of = plan.buckets, plan.bucket_of
        self.augment, self.seed = augment, seed
        self.members = members           # training positions of each bucket (the replacement order)
        self.served = Served()
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys)

    # ---- one image ----------------------------------------------------------------------------------
    def crop_box(self, position: int, size: tuple[int, int], top_left: tuple[int, int] | None):
        """(resized size, (top, left)) of a sample in bucket `size`; center crop when top_left is None."""
        resized, _ = cover(self.sizes[position], size)
        return resized, top_left if top_left is not None else center_offset(resized, size)

    def pixels(self, position: int, size: tuple[int, int], top_left: tuple[int, int] | None = None,
               flip: bool = False) -> torch.Tensor:
        """(C, h, w) uint8: decode, EXIF-rotate, resize to cover `size`, crop at top_left, flip. Workers send
        uint8 (a quarter of float32's bytes through shared memory); `unit_range` converts in the main process."""
        return self.pixels_and_mask(position, size, top_left, flip, "none")[0]

    def pixels_and_mask(self, position: int, size, top_left, flip: bool, mask_mode: str):
        """(pixels, mask or None): the mask (data/masks.py) goes through the same resize, crop and flip."""
        from PIL import ImageOps

        resized, crop = self.crop_box(position, size, top_left)
        with self.reader(self.keys[position]) as im:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an image without EXIF rotation
            key = self.keys[position]  # (several sources: (part, file))
            mask = open_mask(key[1] if isinstance(key, tuple) else key, mask_mode, im) if mask_mode != "none" else None
            im = im.convert("L" if self.augment.channels == 1 else "RGB")
            x = self._transform(im, resized, crop, size, flip)
        return x, (self._transform(mask, resized, crop, size, flip) if mask is not None else None)

    def _transform(self, im, resized, crop, size, flip: bool) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        im = TF.resize(im, list(resized), interpolation=self.augment.interpolation, antialias=True)
        im = TF.crop(im, crop[0], crop[1], size[0], size[1])
        x = TF.pil_to_tensor(im)
        return x.flip(-1) if flip else x

    def stand_in(self, position: int, epoch: int, size: tuple[int, int], error: BaseException | None = None):
        """The next sample of the bucket that decodes, for a file that cannot be decoded any more (the same
        choice in a resumed run, since it depends on the files only); warned once per worker."""
        group = self.members[self.bucket_of[position]] if self.members else []
        start = group.index(position) + 1 if position in group else 0
        for offset in range(len(group)):
            other = group[(start + offset) % len(group)]
            if other == position:
                continue
            try:
                loaded = self.sample(other, epoch, size)
            except Exception:  # noqa: BLE001 (unreadable too: keep looking)
                continue
            if position not in self._reported:
                self._reported.add(position)
                warnings.warn(f"difftrain: image '{self.names[position]}' cannot be decoded any more; training on "
                              f"'{self.names[other]}' in its place (epoch {epoch})", stacklevel=1)
            return loaded
        raise RuntimeError(f"'{self.names[position]}' cannot be read ({type(error).__name__}: {error}) and no other "
                           f"image of its bucket {size} can be read in its place") from error

    def sample(self, position: int, epoch: int, size: tuple[int, int], copy: int = 0) -> Loaded:
        """One training sample: pixels or cached latent parameters, crop offset, flip, caption (dropped or its
        tags drawn), mask."""
        source = self.table.source_of[position]
        rules, mask_mode = self.table.rules[source], self.table.masks[source]
        resized, _ = cover(self.sizes[position], size)
        top, left, flip, drop, g = draws(self.seed, epoch, position, self.augment,
                                         (resized[0] - size[0], resized[1] - size[1]), rules, copy)
        caption = None if self.captions is None else self.captions[position]
        if caption is not None and not drop and g is not None and rules.random_tags:
            caption = rules.draw(caption, g)
        served = self.served
        if served.latents is not None:  # one cached crop per sample; each flip its own entry
            crop, entry = self.cache_crop(position), served.latent_entry(position, flip)
            row = served.latents.get(entry, "mean_logvar")
            if row is None:  # not cached yet (a lazy fill): the step encodes these pixels and caches them
                pixels, mask = self.pixels_and_mask(position, size, crop, flip, mask_mode)
                return Loaded(position, pixels, crop, flip, drop, caption, mask, entry)
            mask = (self.pixels_and_mask(position, size, crop, flip, mask_mode)[1] if mask_mode != "none" else None)
            return Loaded(position, row, crop, flip, drop, caption, mask)
        _, crop = self.crop_box(position, size, None if self.augment.center_crop else (top, left))
        pixels, mask = self.pixels_and_mask(position, size, crop, flip, mask_mode)
        return Loaded(position, pixels, crop, flip, drop, caption, mask)

    # ---- one micro-batch ----------------------------------------------------------------------------
    def __getitem__(self, key: MicroBatchKey) -> dict:
        return self.__getitems__(key)

    def __getitems__(self, key: MicroBatchKey) -> dict:
        n = len(self.keys)
        size = self.buckets[self.bucket_of[key.positions[0] % n]]
        loaded = []
        wanted = [divmod(slot, n)[::-1] for slot in key.positions] + [(p, 0) for p in key.prior]
        for position, copy in wanted:  # (class images of prior preservation take the batch's size)
            try:
                loaded.append(self.sample(position, key.epoch, size, copy))
            except UserError:  # an unreadable cache part: no stand-in for that
                raise
            except Exception as exc:  # noqa: BLE001 (a file that broke since the index was built)
                loaded.append(self.stand_in(position, key.epoch, size, exc))
        return self._collate(key, loaded, size)

    def _collate(self, key, loaded: list[Loaded], size) -> dict:
        """One batch dict; `loaded[i].position` is the position read (a replaced file's stand-in included)."""
        used = [item.position for item in loaded]
        cached = self.served.latents is not None and key.step >= 0
        table = self.table
        sources = [table.source_of[p] for p in used]
        batch = {"step": key.step, "micro": key.micro, "epoch": key.epoch,
                 "indices": torch.tensor(used, dtype=torch.long),
                 "flips": torch.tensor([i.flip for i in loaded]) if self.augment.random_flip else None,
                 "labels": torch.tensor([self.labels[p] for p in used]) if self.labels is not None else None,
                 "original_sizes": torch.tensor([self.sizes[p] for p in used], dtype=torch.long),
                 # (top, left), before a flip
                 "crop_offsets": torch.tensor([i.crop for i in loaded], dtype=torch.long).view(-1, 2),
                 "resized_sizes": torch.tensor([cover(self.sizes[p], size)[0] for p in used], dtype=torch.long),
                 "target_size": size, "sources": torch.tensor(sources, dtype=torch.long)}
        if cached:
            batch.update(self._latent_fields(loaded))
        else:
            batch["pixels"] = torch.stack([i.tensor for i in loaded])
        if table.any_masks:
            full = torch.full((1, *size), 255, dtype=torch.uint8)
            batch["masks"] = torch.stack([i.mask if i.mask is not None else full for i in loaded])
            batch["mask_floor"] = torch.tensor([table.unmasked_weight[s] for s in sources])
        if table.any_prior:
            batch["prior"] = torch.tensor([table.is_class[s] for s in sources], dtype=torch.bool)
            batch["prior_weight"] = torch.tensor([table.prior_weight[s] for s in sources])
        if self.captions is not None:
            dropped = [i.dropped for i in loaded]
            batch["dropped"] = torch.tensor(dropped, dtype=torch.bool)
            batch["captions"] = ["" if i.dropped else i.caption for i in loaded]
            if self.served.text is not None:
                batch.update(self.text_rows(used, dropped))
        return batch

    @staticmethod
    def _latent_fields(loaded: list[Loaded]) -> dict:
        """"latents": the cached rows; with entries still to encode also "latent_fill": which batch rows they
        are, their entries and pixels (the step puts the rows together: families/t2i_caches.py)."""
        present = [i for i, item in enumerate(loaded) if item.entry is None]
        rows = torch.stack([loaded[i].tensor for i in present]) if present else None
        if len(present) == len(loaded):
            return {"latents": rows}
        missing = [i for i, item in enumerate(loaded) if item.entry is not None]
        return {"latents": rows, "latent_fill": {
            "present": torch.tensor(present, dtype=torch.long), "missing": torch.tensor(missing, dtype=torch.long),
            "entries": torch.tensor([loaded[i].entry for i in missing], dtype=torch.long),
            "pixels": torch.stack([loaded[i].tensor for i in missing])}}

    def text_rows(self, positions: list[int], dropped: list[bool]) -> dict:
        """"text": the stacked embedding rows; while a lazy fill lacks some, "text_fill": each row or None,
        and the row ids (the step encodes the missing captions)."""
        served = self.served
        rows = [served.empty_row if d else served.caption_rows[p] for p, d in zip(positions, dropped)]
        got = [served.text.row(r) for r in rows]
        if any(g is None for g in got):
            return {"text_fill": {"rows": rows, "got": got}}
        return {"text": {name: torch.stack([g[name] for g in got]) for name in got[0]}}

    def cache_crop(self, position: int) -> tuple[int, int]:
        """The one crop of a sample in the latent cache: the center, or (random crops) one draw of
        (seed, position) -- the same in every run with this seed."""
        size = self.buckets[self.bucket_of[position]]
        resized, _ = cover(self.sizes[position], size)
        if self.augment.center_crop:
            return center_offset(resized, size)
        g = torch.Generator().manual_seed(seed_for(self.seed, 0, f"cache_crop/{position}"))
        return (int(torch.randint(0, resized[0] - size[0] + 1, (1,), generator=g)),
                int(torch.randint(0, resized[1] - size[1] + 1, (1,), generator=g)))

    def cache_item(self, position: int) -> tuple[int, torch.Tensor]:
        """(position, pixels at the cache crop) of one sample, for the latent cache filled ahead."""
        return position, self.pixels(position, self.buckets[self.bucket_of[position]], self.cache_crop(position))

    def fixed_batch(self, positions: list[int], size: tuple[int, int]) -> dict:
        """Un-augmented samples at `size` (center crop, no flip, no dropout, no tag draws): the validation
        loss inputs."""
        loaded = [Loaded(p, self.pixels(p, size), self.crop_box(p, size, None)[1], False, False,
                         None if self.captions is None else self.captions[p]) for p in positions]
        key = MicroBatchKey(-1, 0, 0, tuple(positions))
        saved, self.augment = self.augment, Augment(True, False, 0.0, self.augment.channels,
                                                    self.augment.interpolation)
        try:
            return self._collate(key, loaded, size)
        finally:
            self.augment = saved


class CacheItems(torch.utils.data.Dataset):
    """The samples of a latent cache build, decoded by DataLoader workers (one item at a time, in order)."""

    def __init__(self, samples: ImageSamples, positions: list[int]) -> None:
        self.samples, self.positions = samples, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.samples.cache_item(self.positions[i])


def file_reader(key: str):
    from PIL import Image

    return Image.open(key)


class RowReader:
    """Opens row `key` of a `datasets` dataset from its encoded bytes (picklable: workers get a copy of the
    memory-mapped table, not of the images)."""

    def __init__(self, rows, image_column: str) -> None:
        import datasets

        self.rows = rows.cast_column(image_column, datasets.Image(decode=False))
        self.column = image_column

    def __call__(self, key: int):
        from PIL import Image

        cell = self.rows[int(key)][self.column]
        if cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        return Image.open(cell["path"])


class TensorSamples(ImageSamples):
    """Images already in memory as (N, C, H, W) in [-1, 1] (the digits): the same batches, no decoding."""

    def __init__(self, images: torch.Tensor, index, plan, augment: Augment, seed: int, members) -> None:
        super().__init__(None, index, plan, augment, seed, members)
        self.images = images

    def pixels_and_mask(self, position, size, top_left, flip, mask_mode):
        x = self.images[position]
        return (x.flip(-1) if flip else x), None

    def crop_box(self, position, size, top_left):
        return tuple(size), (0, 0)
