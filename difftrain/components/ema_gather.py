"""DeepSpeed ZeRO-3 support for `EMAModel`: gather partitioned parameters in bounded groups.

Under ZeRO-3 every parameter built inside `deepspeed.zero.Init` is a partition: `p.numel()` is 0 on a
rank until it is gathered, and such a parameter carries a `ds_id` attribute. diffusers' EMAModel gathers
either the whole model at once (foreach path, peak memory = the unsharded model on every rank) or one tensor
at a time (one all-gather per tensor). Here the parameters are cut into consecutive groups whose gathered
size stays under a byte budget, and each group is gathered once.

`deepspeed` is imported only when a ZeRO-3 parameter is actually seen, never at module import. Tests patch
`gathered_parameters` (the single place that touches deepspeed) with a fake context manager.

FSDP2 (`distributed=fsdp2`) parameters are DTensors: each rank holds a shard, `p.shape` is the full shape.
They are gathered the same way, in the same byte-bounded groups: for the duration of a group each DTensor
member of the caller's list `params` is replaced by its full tensor (`full_tensor()`, one all-gather per
parameter, every rank) and put back after; with `modifier_rank` set, what the caller wrote into the full
tensors is first written back into the shards (rank `modifier_rank`'s values, as DeepSpeed does). Every
rank must call with the same parameters in the same order (the gathers are collectives).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch

#: default gathered bytes per group (fp32: 64M elements)
DEFAULT_GATHER_BUCKET_BYTES = 256 << 20


def is_zero3_param(p: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (DeepSpeed tags them with `ds_id`)."""
    return hasattr(p, "ds_id")


def any_zero3(params: Sequence[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def _dtensor_class():
    """DTensor when torch.distributed.tensor is loaded (FSDP2 loads it); otherwise no tensor can be one, and
    the (slow) import is not paid by runs without it."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(p: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 shard; `p.shape` and `p.numel()` are the full tensor's)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(p, cls)


@contextlib.contextmanager
def full_dtensors(params: list[torch.Tensor], group: list[int], modifier_rank: int | None) -> Iterator[None]:
    """Swap the DTensor members of `params[group]` for their full tensors (same `requires_grad`) while the
    body runs; with `modifier_rank`, write that rank's full values back into the shards before the swap back."""
    sharded = {i: params[i] for i in group if is_dtensor(params[i])}
    if not sharded:
        yield
        return
    if not isinstance(params, list):
        raise TypeError("DTensor (FSDP2) parameters are gathered in place of the list's members: pass a list")
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for i, p in sharded.items():
            params[i] = p.detach().full_tensor().requires_grad_(p.requires_grad)
    try:
        yield
        if modifier_rank is not None:
            with torch.no_grad():
                for i, p in sharded.items():
                    full = params[i].detach().to(p.dtype)
                    p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=modifier_rank))
    finally:
        for i, p in sharded.items():
            params[i] = p


def full_nbytes(p: torch.Tensor) -> int:
    """Bytes the parameter occupies once gathered (`ds_numel` for a partition, else `numel`)."""
    numel = getattr(p, "ds_numel", None)
    if numel is None:
        numel = p.numel()
    return int(numel) * p.element_size()


def bucket_by_bytes(params: Sequence[torch.Tensor], budget_bytes: int) -> list[list[int]]:
    """Split `range(len(params))` into consecutive groups of at most `budget_bytes` gathered bytes.

    The order is kept (it must be identical on every rank, or the collectives deadlock). A parameter larger
    than the budget forms a group of its own. Zero-byte parameters join the current group.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, p in enumerate(params):
        size = full_nbytes(p)
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


def gathered_parameters(params: list[torch.Tensor], modifier_rank: int | None):
    """The real gather context: `deepspeed.zero.GatheredParameters`, imported lazily."""
    import deepspeed  # lazy on purpose: only reached with ZeRO-3 parameters

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def iter_gathered(
    params: Sequence[torch.Tensor],
    budget_bytes: int = DEFAULT_GATHER_BUCKET_BYTES,
    modifier_rank: int | None = None,
) -> Iterator[list[int]]:
    """Yield index groups of `params`; while a group is being processed its ZeRO-3 members are gathered.

    Without any ZeRO-3 parameter this yields one group with every index and gathers nothing. A group that
    holds no ZeRO-3 parameter is yielded without a gather context. `modifier_rank=0` must be used when the
    caller writes into the parameters (e.g. `copy_to`); `None` for read-only access (e.g. `step`). DTensor
    members of the list `params` are replaced by their full tensors within their group (module docstring).
    """
    if not any_zero3(params) and not any(is_dtensor(p) for p in params):
        yield list(range(len(params)))
        return
    for group in bucket_by_bytes(params, budget_bytes):
        zero_params = [params[i] for i in group if is_zero3_param(params[i])]
        ctx = gathered_parameters(zero_params, modifier_rank) if zero_params else contextlib.nullcontext()
        with ctx, full_dtensors(params, group, modifier_rank):  # type: ignore[arg-type]
            yield group
