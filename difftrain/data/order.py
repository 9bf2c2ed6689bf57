"""The replayable batch order, with aspect-ratio buckets.

The order of an epoch is a pure function of (seed, epoch): each bucket's training samples are shuffled
with a generator of (seed, epoch), cut into micro-batches of `batch_size` (a bucket's last partial batch is
dropped for that epoch; the shuffle puts other samples there next epoch), and with more than one bucket
the list of micro-batches is shuffled too. Micro-batch j of an epoch goes to (step, micro, rank) with
j = (step * grad_accum + micro) mod per_epoch * world_size + rank, so every rank gets its own batch of each
step and every micro-batch holds one bucket. The batch of optimizer step `s` is computed from `s` alone:
resume needs no sampler state and can never replay or skip samples.

With one bucket this is exactly the order of a plain permutation cut into consecutive batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from difftrain.components.seeding import seed_for
from difftrain.errors import UserError


def holdout(n: int, split: float, seed: int) -> list[int]:
    """The sample positions held out for validation: `split` as a fraction (< 1) or a count (>= 1), drawn
    once from the seed; sorted."""
    if not split:
        return []
    count = int(split) if split >= 1 else max(1, round(split * n))
    if count >= n:
        raise UserError(f"data.validation_split={split} holds out {count} of {n} samples, leaving none to train "
                        "on; use a smaller fraction or count")
    g = torch.Generator().manual_seed(seed_for(seed, 0, "validation_split"))
    return sorted(torch.randperm(n, generator=g)[:count].tolist())


@dataclass(frozen=True)
class Mixing:
    """How several sources share an epoch (data=sources, docs/recipes.md). A sample's `slot` is
    position + copy * num_positions: copy k of a repeated sample gets its own augmentation draws."""

    num_positions: int
    repeats: list[float]                        # per position: 1 = once per epoch, 2.5 = twice + half of them
    prior_pool: list[int | None]                # per position: the class-image pool paired with it, or None
    pools: list[list[int]] = field(default_factory=list)   # class-image positions of each pool


class BatchOrder:
    """Sample slots of (step, micro-batch, rank), from the training positions of each bucket."""

    def __init__(self, groups: list[list[int]], batch_size: int, grad_accum: int, world_size: int,
                 seed: int, mixing: Mixing | None = None) -> None:
        self.batch_size, self.world_size, self.seed, self.mixing = batch_size, world_size, seed, mixing
        self.micro_per_step = grad_accum
        self.groups, self.partial = [], []  # per bucket: the slots of every epoch, and (pool, count) draws
        for members in groups:
            fixed, partial = self._expand(members)
            if len(fixed) or partial:
                self.groups.append(torch.tensor(fixed, dtype=torch.long))
                self.partial.append(partial)
        batches = sum(self._group_size(i) // batch_size for i in range(len(self.groups)))
        self.micro_per_epoch = batches // world_size  # per rank
        if self.micro_per_epoch < grad_accum:
            n = self.n
            raise UserError(
                f"the dataset has {n} training samples in {len(self.groups)} bucket(s), giving {batches} full "
                f"micro-batches per epoch, fewer than one optimizer step needs ({batch_size} x {grad_accum} "
                f"accumulation x {world_size} processes); lower trainer.batch_size or trainer.grad_accum, "
                "use fewer buckets, or add data")
        self._epoch, self._batches = -1, None

    def _expand(self, members: list[int]) -> tuple[list[int], list[tuple[torch.Tensor, int]]]:
        """(slots in every epoch, [(pool of slots, how many of it each epoch)]) of one bucket's positions."""
        if self.mixing is None:
            return list(members), []
        n, repeats = self.mixing.num_positions, self.mixing.repeats
        fixed = [p + copy * n for copy in range(max((int(repeats[p]) for p in members), default=0))
                 for p in members if int(repeats[p]) > copy]
        pools: dict[tuple[int, float], list[int]] = {}
        for p in members:
            whole, fraction = int(repeats[p]), repeats[p] - int(repeats[p])
            if fraction > 0:
                pools.setdefault((whole, fraction), []).append(p + whole * n)
        partial = [(torch.tensor(slots, dtype=torch.long), round(fraction * len(slots)))
                   for (_, fraction), slots in sorted(pools.items())]
        return fixed, [(pool, count) for pool, count in partial if count]

    def _group_size(self, i: int) -> int:
        return len(self.groups[i]) + sum(count for _, count in self.partial[i])

    @property
    def n(self) -> int:
        return sum(self._group_size(i) for i in range(len(self.groups)))

    def epoch_members(self, epoch: int, i: int) -> torch.Tensor:
        """The slots of bucket i in `epoch`: every whole repeat, plus a draw of (seed, epoch, bucket) from each
        fractional pool (the same count every epoch, so every epoch has the same number of batches)."""
        if not self.partial[i]:
            return self.groups[i]
        g = torch.Generator().manual_seed(seed_for(self.seed, 0, f"repeats/{epoch}/{i}"))
        drawn = [pool[torch.randperm(len(pool), generator=g)[:count]] for pool, count in self.partial[i]]
        return torch.cat([self.groups[i], *drawn])

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every micro-batch of `epoch`, in order (cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, "data") + epoch)
            batches = []
            for i in range(len(self.groups)):
                members = self.epoch_members(epoch, i)
                shuffled = members[torch.randperm(len(members), generator=g)]
                full = len(members) // self.batch_size * self.batch_size
                if full:  # (an empty tensor splits into one empty batch)
                    batches += list(shuffled[:full].split(self.batch_size))
            if len(self.groups) > 1:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            self._epoch, self._batches = epoch, batches
        return self._batches

    def indices(self, step: int, micro: int, rank: int) -> tuple[int, torch.Tensor]:
        """(epoch, sample slots) of one micro-batch (slots are positions unless sources repeat)."""
        return self.locate(step, micro, rank)[:2]

    def locate(self, step: int, micro: int, rank: int) -> tuple[int, torch.Tensor, int]:
        k = step * self.micro_per_step + micro
        epoch, pos = divmod(k, self.micro_per_epoch)
        j = pos * self.world_size + rank
        return epoch, self.epoch_batches(epoch)[j], j

    def class_positions(self, epoch: int, j: int, slots: torch.Tensor) -> tuple[int, ...]:
        """DreamBooth pairing: one class image for each sample of micro-batch j whose source has prior
        preservation, walking a permutation of (seed, epoch) of its class-image pool."""
        if self.mixing is None or not self.mixing.pools:
            return ()
        n, out = self.mixing.num_positions, []
        for i, slot in enumerate(slots.tolist()):
            pool_id = self.mixing.prior_pool[slot % n]
            if pool_id is None:
                continue
            pool, perm = self.mixing.pools[pool_id], self._pool_order(epoch, pool_id)
            out.append(pool[int(perm[(j * self.batch_size + i) % len(pool)])])
        return tuple(out)

    def _pool_order(self, epoch: int, pool_id: int) -> torch.Tensor:
        """The class-image order of (seed, epoch) of one pool (the current epoch's kept)."""
        if getattr(self, "_pool_epoch", None) != epoch:
            self._pool_epoch, self._pool_orders = epoch, {}
        if pool_id not in self._pool_orders:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, f"prior/{epoch}/{pool_id}"))
            self._pool_orders[pool_id] = torch.randperm(len(self.mixing.pools[pool_id]), generator=g)
        return self._pool_orders[pool_id]
