"""Values across ranks: rank 0's value everywhere, sums and maxima over ranks, metric sums by name.

Each is the value itself in one process (or before a process group has started).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from emakit.distributed.environment import world_size

__all__ = ["all_reduce_sums", "from_rank0", "max_over_ranks", "sum_over_ranks"]


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable Python value; ``value`` itself in one process)."""
    if world_size() <= 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over all ranks (float64; ``values`` itself in one process)."""
    if world_size() <= 1 or not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    if world_size() <= 1 or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sums(totals: dict[str, list[float]], device: torch.device) -> dict[str, list[float]]:
    """``{name: [total, count]}`` summed over all ranks, by name (a rank may lack names: it had no batches)."""
    if world_size() <= 1 or not dist.is_initialized():
        return totals
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(totals))
    names = sorted({name for names in gathered for name in names or ()})
    flat = [value for name in names for value in totals.get(name, [0.0, 0])]
    summed = sum_over_ranks(flat, device)
    return {name: [summed[2 * i], summed[2 * i + 1]] for i, name in enumerate(names)}
