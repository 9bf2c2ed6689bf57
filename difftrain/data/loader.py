"""Micro-batches of a run through a torch DataLoader: `trainer.num_workers` worker processes decode ahead
of the step that needs them (prefetch, pinned memory on CUDA), fed by a batch sampler that walks the
replayable order (data/order.py) from the step a run starts or resumes at.

Which samples a micro-batch holds and every random draw in it depend on (seed, step, micro, rank) only,
so 0 and 2 workers give bitwise-identical batches; the stream checks that each batch it hands out is the
one asked for.
"""

from __future__ import annotations

import torch

from difftrain.data.samples import MicroBatchKey, unit_range


class MicroBatchSampler:
    """Yields the MicroBatchKey of every (step, micro) of one rank from `start_step` to `max_steps`."""

    def __init__(self, order, rank: int, start_step: int, max_steps: int) -> None:
        self.order, self.rank, self.start_step, self.max_steps = order, rank, start_step, max_steps

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.order.micro_per_step):
                epoch, slots, j = self.order.locate(step, micro, self.rank)
                yield MicroBatchKey(step, micro, epoch, tuple(slots.tolist()), self.order.class_positions(epoch, j, slots))

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.order.micro_per_step


def _identity(batch):
    return batch  # ImageSamples.__getitems__ already returns the collated batch


class BatchStream:
    """`batch(step, micro)` in increasing order; the DataLoader is started at the first request."""

    def __init__(self, samples, order, rank: int, max_steps: int, num_workers: int, prefetch_factor: int,
                 pin_memory: bool) -> None:
        self.samples, self.order, self.rank, self.max_steps = samples, order, rank, max_steps
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self._iterator, self._next = None, None

    def _start(self, step: int) -> None:
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.samples, batch_sampler=MicroBatchSampler(self.order, self.rank, step, self.max_steps),
            collate_fn=_identity, num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None, persistent_workers=workers > 0)
        self._iterator, self._next = iter(loader), (step, 0)

    def batch(self, step: int, micro: int) -> dict:
        if self._iterator is None or self._next != (step, micro):
            self.close()
            self._start(step)
            for _ in range(micro):  # only when a caller starts mid-step (never the Trainer)
                next(self._iterator)
        batch = next(self._iterator)
        if (batch["step"], batch["micro"]) != (step, micro):
            raise RuntimeError(f"data stream out of order: got step {batch['step']} micro {batch['micro']}, "
                               f"expected {step} {micro}")
        if "pixels" in batch:
            batch["pixels"] = unit_range(batch["pixels"])
        last = micro + 1 == self.order.micro_per_step
        self._next = (step + 1, 0) if last else (step, micro + 1)
        return batch

    def close(self) -> None:
        """Stops the workers (they also stop at the end of the run's steps)."""
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._iterator, self._next = None, None
