"""The replayable batch order.

The order of the data is a pure function of (seed, epoch): a permutation drawn from a generator
seeded with both. The batch of optimizer step `s` is therefore computed from `s` alone, so resume
needs no sampler state and can never replay or skip samples.
"""

from __future__ import annotations

import torch

from difftrain.components.seeding import seed_for
from difftrain.errors import UserError


class BatchOrder:
    """Global sample indices of (step, micro-batch, rank): epoch permutations of (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.world_size, self.seed = n, batch_size, world_size, seed
        self.micro_per_step = grad_accum
        self.global_micro = batch_size * world_size
        self.micro_per_epoch = n // self.global_micro
        if self.micro_per_epoch < grad_accum:
            raise UserError(
                f"the dataset has {n} samples, fewer than one optimizer step needs "
                f"({batch_size} x {grad_accum} accumulation x {world_size} processes); "
                "lower trainer.batch_size or trainer.grad_accum, or add data")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0, "data") + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> tuple[int, torch.Tensor]:
        """(epoch, indices) of one micro-batch; the last incomplete micro-batch of an epoch is dropped."""
        k = step * self.micro_per_step + micro
        epoch, pos = divmod(k, self.micro_per_epoch)
        start = pos * self.global_micro + rank * self.batch_size
        return epoch, self._permutation(epoch)[start : start + self.batch_size]
