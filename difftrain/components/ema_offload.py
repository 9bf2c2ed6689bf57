"""CPU-offloaded EMA shadows for `EMAModel(offload=True)`.

The shadows live in ONE flat float32 CPU buffer (pinned when CUDA is available), allocated once;
`shadow_params[i]` are views into it. A step copies the live parameters, in chunks, into two preallocated
staging buffers (double buffering: the device-to-host copy of chunk k+1 runs while the CPU updates chunk k),
waits for each chunk's copy to finish (CUDA event) before the CPU reads it, and updates the shadows with one
`lerp_` per contiguous run. No host memory is allocated per step, and no `cudaHostAlloc` happens after the first.

diffusers' example instead moves the whole EMA to the GPU and back every step (`to(non_blocking=True)`),
allocating fresh host tensors for every transfer and never synchronizing before the CPU reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: default staging chunk (each of the two staging buffers), bytes of fp32
DEFAULT_OFFLOAD_CHUNK_BYTES = 64 << 20


def sync_devices(tensors: Sequence[torch.Tensor]) -> None:
    """Wait for pending copies on every accelerator that holds one of `tensors` (no-op on CPU)."""
    seen = set()
    for t in tensors:
        dev = t.device
        if dev.type == "cpu" or dev in seen:
            continue
        seen.add(dev)
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        elif hasattr(torch, "accelerator"):  # mps / xpu / ... (torch >= 2.6)
            torch.accelerator.synchronize(dev)


def can_pin() -> bool:
    return torch.cuda.is_available()


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


class OffloadBuffers:
    """Flat fp32 host storage for the shadows plus double-buffered staging for the update."""

    def __init__(self, shapes: Sequence[torch.Size], chunk_bytes: int = DEFAULT_OFFLOAD_CHUNK_BYTES):
        if chunk_bytes < 4:
            raise ValueError(f"offload chunk_bytes must be >= 4, got {chunk_bytes}")
        self.pinned = can_pin()
        numels = [int(torch.Size(s).numel()) for s in shapes]
        self.offsets = [0] * len(numels)
        total = 0
        for i, n in enumerate(numels):
            self.offsets[i] = total
            total += n
        self.flat = torch.empty(total, dtype=torch.float32, pin_memory=self.pinned)
        self.views = [self.flat[o : o + n].view(s) for o, n, s in zip(self.offsets, numels, shapes)]
        self.numels = numels
        self.chunk_numel = max(1, min(chunk_bytes // 4, total))
        self._staging: list[torch.Tensor] | None = None  # allocated on the first update, then reused
        self._plans: dict[tuple[int, ...], list] = {}

    def staging_buffers(self) -> list[torch.Tensor]:
        if self._staging is None:
            self._staging = [
                torch.empty(self.chunk_numel, dtype=torch.float32, pin_memory=self.pinned) for _ in range(2)
            ]
        return self._staging

    def _plan(self, trainable: tuple[int, ...]) -> list:
        """Chunks of (copies, runs): copies = (param idx, offset in param, offset in staging, n);
        runs = (offset in flat shadow, offset in staging, n), adjacent spans merged."""
        plan = self._plans.get(trainable)
        if plan is not None:
            return plan
        plan, copies, runs, fill = [], [], [], 0
        for i in trainable:
            n, off = self.numels[i], 0
            while off < n:
                take = min(n - off, self.chunk_numel - fill)
                copies.append((i, off, fill, take))
                flat_off = self.offsets[i] + off
                if runs and runs[-1][0] + runs[-1][2] == flat_off and runs[-1][1] + runs[-1][2] == fill:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + take)
                else:
                    runs.append((flat_off, fill, take))
                fill += take
                off += take
                if fill == self.chunk_numel:
                    plan.append((copies, runs))
                    copies, runs, fill = [], [], 0
        if copies:
            plan.append((copies, runs))
        self._plans[trainable] = plan
        return plan

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], trainable: list[int], frozen: list[int], weight: float):
        """shadow[i] <- lerp(shadow[i], fp32(params[i]), weight) for i in trainable; copy for i in frozen."""
        for i in frozen:
            self.views[i].copy_(params[i].detach(), non_blocking=True)
        plan = self._plan(tuple(trainable))
        cuda_devs = sorted({params[i].device for i in trainable if params[i].is_cuda}, key=str)
        other_accel = [params[i] for i in trainable if params[i].device.type not in ("cpu", "cuda")]
        staging = self.staging_buffers() if plan else []
        pending = None
        for k, (copies, runs) in enumerate(plan):
            buf = staging[k % 2]  # chunk k-2 used it and was applied synchronously below
            for i, p_off, b_off, n in copies:
                buf[b_off : b_off + n].copy_(_flat(params[i])[p_off : p_off + n], non_blocking=True)
            events = []
            for dev in cuda_devs:  # the D2H copies were queued on the source device's current stream
                events.append(torch.cuda.Event())
                events[-1].record(torch.cuda.current_stream(dev))
            sync_devices(other_accel)  # mps/xpu: no event API used here, wait for the device instead
            if pending is not None:
                self._apply(*pending, weight)
            pending = (buf, runs, events)
        if pending is not None:
            self._apply(*pending, weight)
        sync_devices([params[i] for i in frozen])  # the frozen D2H copies land before anyone reads them

    def _apply(self, buf: torch.Tensor, runs: list, events: list, weight: float) -> None:
        for event in events:
            event.synchronize()  # the non_blocking D2H copies into `buf` have landed
        for flat_off, b_off, n in runs:
            self.flat[flat_off : flat_off + n].lerp_(buf[b_off : b_off + n], weight)
