"""Aspect-ratio buckets: which (height, width) each image trains at, and how it is resized and cropped there.

- `data.buckets=none`: one square bucket of `data.resolution` (resize the shorter side, crop).
- `data.buckets=auto`: a ladder of sizes of about `data.resolution`^2 pixels whose sides are multiples of
  `data.bucket_step` (default: the model's size multiple, latent multiple x VAE factor), aspect ratios 1:4 to
  4:1, always including the square.
- an explicit list `[[h, w], ...]`.

An image goes to the bucket of the nearest aspect ratio (in log space, so 2:1 and 1:2 are equally far from
1:1; ties go to the earlier bucket), is resized to cover it (the smallest scale at which both sides reach
the bucket) and cropped to it. An image that would be upscaled by more than `data.max_upscale` is too small.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

MAX_ASPECT = 4.0


def auto_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """Sizes (h, w), sides multiples of `step`, area at most resolution^2 and as close to it as the step
    allows, aspect ratios within 1:4..4:1, sorted by aspect ratio (tall to wide)."""
    area = resolution * resolution
    out = set()
    width = step
    while width <= resolution * MAX_ASPECT:
        height = (area // width) // step * step
        if height >= step and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            out.update({(height, width), (width, height)})  # the ladder is symmetric: portrait and landscape
        width += step
    square = resolution // step * step
    if square >= step:
        out.add((square, square))
    return sorted(out, key=lambda hw: (hw[1] / hw[0], -hw[0] * hw[1]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    h, w = size
    ratio = math.log(w / h)
    return min(range(len(buckets)), key=lambda b: abs(ratio - math.log(buckets[b][1] / buckets[b][0])))


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """((resized h, resized w), scale): the smallest resize of `size` that covers `bucket`."""
    (h, w), (bh, bw) = size, bucket
    scale = max(bh / h, bw / w)
    return (max(bh, round(h * scale)), max(bw, round(w * scale))), scale


def center_offset(resized: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


@dataclass(frozen=True)
class BucketPlan:
    """The buckets, the bucket of every sample, and the samples too small for theirs."""

    buckets: list[tuple[int, int]]
    bucket_of: list[int]
    too_small: list[int]            # sample positions upscaled by more than max_upscale

    def counts(self) -> Counter:
        return Counter(self.bucket_of)

    def most_common(self) -> tuple[int, int]:
        """The size of the most common bucket (the smaller bucket index on a tie)."""
        counts = self.counts()
        best = max(sorted(counts), key=lambda b: counts[b])
        return self.buckets[best]


def resolve_buckets(setting, resolution: int, step: int) -> list[tuple[int, int]]:
    if setting in (None, "none"):
        return [(resolution, resolution)]
    if setting == "auto":
        return auto_buckets(resolution, step)
    return [(int(h), int(w)) for h, w in setting]


def plan_buckets(sizes: list[tuple[int, int]], setting, resolution: int, step: int,
                 max_upscale: float) -> BucketPlan:
    buckets = resolve_buckets(setting, resolution, step)
    bucket_of, too_small = [], []
    for i, size in enumerate(sizes):
        b = nearest_bucket(size, buckets) if len(buckets) > 1 else 0
        bucket_of.append(b)
        if cover(size, buckets[b])[1] > max_upscale:
            too_small.append(i)
    return BucketPlan(buckets, bucket_of, too_small)
