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


class BatchOrder:
    """Sample positions of (step, micro-batch, rank), from the training positions of each bucket."""

    def __init__(self, groups: list[list[int]], batch_size: int, grad_accum: int, world_size: int,
                 seed: int) -> None:
        self.groups = [torch.tensor(g, dtype=torch.long) for g in groups if len(g)]
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.micro_per_step = grad_accum
        batches = sum(len(g) // batch_size for g in self.groups)
        self.micro_per_epoch = batches // world_size  # per rank
        if self.micro_per_epoch < grad_accum:
            n = sum(len(g) for g in self.groups)
            raise UserError(
                f"the dataset has {n} training samples in {len(self.groups)} bucket(s), giving {batches} full "
                f"micro-batches per epoch, fewer than one optimizer step needs ({batch_size} x {grad_accum} "
                f"accumulation x {world_size} processes); lower trainer.batch_size or trainer.grad_accum, "
                "use fewer buckets, or add data")
        self._epoch, self._batches = -1, None

    @property
    def n(self) -> int:
        return sum(len(g) for g in self.groups)

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every micro-batch of `epoch`, in order (cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, "data") + epoch)
            batches = []
            for members in self.groups:
                shuffled = members[torch.randperm(len(members), generator=g)]
                full = len(members) // self.batch_size * self.batch_size
                if full:  # (an empty tensor splits into one empty batch)
                    batches += list(shuffled[:full].split(self.batch_size))
            if len(self.groups) > 1:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            self._epoch, self._batches = epoch, batches
        return self._batches

    def indices(self, step: int, micro: int, rank: int) -> tuple[int, torch.Tensor]:
        """(epoch, sample positions) of one micro-batch."""
        k = step * self.micro_per_step + micro
        epoch, pos = divmod(k, self.micro_per_epoch)
        return epoch, self.epoch_batches(epoch)[pos * self.world_size + rank]
