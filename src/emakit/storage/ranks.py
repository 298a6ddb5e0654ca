"""``shard_over_ranks``: a group's average split 1/N over the ranks of data parallelism, and how its pieces travel.

Under data parallelism (DDP, ZeRO-1/2) every rank holds the whole weights. The group's tensors, each flattened in
its memory order and laid end to end, make one *flat layout* of ``total`` elements; rank ``r`` of ``n`` keeps the
average of elements ``[r * s, min((r + 1) * s, total))``, ``s = ceil(total / n)``::

    flat layout:   | tensor 0      | tensor 1                   | tensor 2 |     (no padding between tensors)
    rank 0:        [<-------- s -------->)
    rank 1:                              [<-------- s -------->)
    rank 2:                                                    [<-- s -->)+pad

A rank's *pieces* are the parts of the tensors its slice covers (the first and last may be partial): views of the
model's memory, read in place by every update (no copy, no communication). A contiguous split rather than one
aligned to tensors: every rank holds ``s`` elements whatever the tensors' sizes (a split aligned to tensors leaves
a rank holding a large embedding with far more than 1/N), and every rank's slice is the same length, so a gather is
one ``all_gather_single`` (``all_gather_into_tensor``) per chunk with no per-rank sizes to exchange.

How the pieces travel (every rank calls each, in one order):

- :meth:`RankSlices.gather_into`: the whole average into whole tensors on every rank (a swap, a copy into the model,
  ``ema_model``): one ``all_gather_single`` per chunk of at most 16 MiB received, written into the tensors;
- :meth:`RankSlices.gather_tensor`: one tensor's average, to rank 0 (exports) or to every rank, from the ranks that
  hold a piece of it (point to point: each element travels once).

Example (2 ranks, tensors of 3 and 5 elements: ``s = 4``)::

    >>> RankSlices(["a", "b"], [torch.zeros(3), torch.zeros(5)], rank=1, world=2).pieces
    [(1, 1, 5)]                # rank 1 holds elements 1..5 of tensor "b" (flat elements 4..8)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
import torch.distributed as dist

from emakit.storage import fsdp1, zero
from emakit.storage.layout import CHUNK_BYTES, is_dense
from emakit.storage.sharded import is_dtensor

__all__ = ["ENGINE", "RankSlices", "flat", "ranks", "record", "split_over_ranks"]

ENGINE = "shard_over_ranks"  # the engine a state's partitioning record names


def ranks() -> tuple[int, int] | None:
    """``(rank, world size)`` of the default process group when it has more than one rank, else None (no split)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def split_over_ranks(named: dict[str, torch.Tensor], wanted: bool) -> tuple[int, int] | None:
    """``(rank, world size)`` when ``shard_over_ranks`` (``wanted``) splits these tensors' averages, else None: not
    wanted, no process group, or one rank (then the average is whole, as without it).

    Tensors an engine already shards are refused, naming it: their average already lives in shards, 1/N per rank.
    """
    if not wanted:
        return None
    for name, tensor in named.items():
        engine = (
            "FSDP2 (a DTensor)"
            if is_dtensor(tensor)
            else "DeepSpeed ZeRO-3"
            if zero.is_zero3(tensor)
            else "FSDP1 (a flat shard)"
            if fsdp1.is_fsdp1(tensor)
            else None
        )
        if engine:
            raise ValueError(
                f"shard_over_ranks=True splits whole (data-parallel) weights over the ranks, but {name!r} is already "
                f"sharded by {engine}: its average already lives in shards, 1/N per rank; use shard_over_ranks=False"
            )
    return ranks()


def record(rank: int, world: int, total: int) -> dict:
    """The partitioning record of a state holding rank ``rank``'s slices of ``world``, ``total`` elements in all."""
    return {"engine": ENGINE, "rank": rank, "world_size": world, "total": total}


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements in memory order, as a 1-D view of its memory (detached: no autograd, shared version
    counter). ``tensor`` must be dense (every element of its span used once, in any dim order)."""
    return tensor.detach().as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def _all_gather(output: torch.Tensor, sent: torch.Tensor) -> None:
    """Every rank's ``sent`` end to end in ``output``: ``all_gather_single`` (torch >= 2.13), else its older name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, sent)


class RankSlices:
    """Which elements of a group's flat layout this rank keeps, as pieces of the group's tensors.

    ``pieces``: ``(k, a, b)`` per tensor ``k`` this rank's slice covers, elements ``a..b`` of ``flat(tensors[k])``,
    in order; their averages lie end to end in this rank's slice (``s`` elements, the tail padded).

    Raises ValueError naming a tensor that is not dense (a strided view): its elements are not one run of memory.
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor], rank: int, world: int) -> None:
        for name, tensor in zip(names, tensors):
            if not is_dense(tensor):
                raise ValueError(
                    f"shard_over_ranks splits the tensors' memory across ranks, but {name!r} is not dense (shape "
                    f"{tuple(tensor.shape)}, strides {tensor.stride()}: a view with gaps); make it contiguous, "
                    "leave it out (exclude=...) or use shard_over_ranks=False"
                )
        self.rank, self.world = rank, world
        self.numels = [t.numel() for t in tensors]
        self.starts = [0]
        for numel in self.numels:
            self.starts.append(self.starts[-1] + numel)
        self.total = self.starts[-1]
        self.size = max(1, -(-self.total // world))  # s: every rank's slice, padded
        self.pieces = self.covering(min(rank * self.size, self.total), min((rank + 1) * self.size, self.total))
        self.piece_of = {k: i for i, (k, _, _) in enumerate(self.pieces)}

    def covering(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(k, a, b)`` for the parts of tensors that flat elements ``lo..hi`` cover, in order."""
        pieces = []
        k = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi and k < len(self.numels):
            start = self.starts[k]
            a, b = max(lo, start) - start, min(hi, self.starts[k + 1]) - start
            if b > a:
                pieces.append((k, a, b))
            k += 1
        return pieces

    def owners(self, k: int) -> list[tuple[int, int, int]]:
        """``(rank, a, b)``: which rank holds elements ``a..b`` of tensor ``k``."""
        start, stop = self.starts[k], self.starts[k + 1]
        if stop == start:
            return []
        return [
            (r, max(start, r * self.size) - start, min(stop, (r + 1) * self.size) - start)
            for r in range(start // self.size, (stop - 1) // self.size + 1)
        ]

    # ------------------------------------------------------------------ traffic
    @torch.no_grad()
    def gather_into(self, mine: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Every rank's slice (``mine`` here: ``s`` elements) written into ``tensors`` (whole tensors laid out as the
        group's, on every rank; cast to their dtype). One ``all_gather_single`` per chunk: at most 16 MiB is
        received at a time, beside the tensors. Collective."""
        dtype, device = tensors[0].dtype, tensors[0].device
        views = [flat(t) for t in tensors]
        step = max(1, CHUNK_BYTES // (self.world * tensors[0].element_size()))
        received = torch.empty(self.world * min(step, self.size), dtype=dtype, device=device)
        for first in range(0, self.size, step):
            n = min(step, self.size - first)
            sent = mine[first : first + n].to(device=device, dtype=dtype)  # a view when nothing to cast or move
            chunk = received[: self.world * n]
            _all_gather(chunk, sent)  # rank r's part: flat elements r*s + first, ... + n
            targets, pieces = [], []
            for r in range(self.world):
                lo = r * self.size + first
                for k, a, b in self.covering(lo, min(lo + n, self.total)):
                    at = r * n + self.starts[k] + a - lo
                    targets.append(views[k][a:b])
                    pieces.append(chunk[at : at + b - a])
            if targets:
                torch._foreach_copy_(targets, pieces)

    @torch.no_grad()
    def gather_tensor(
        self, k: int, piece: torch.Tensor, like: torch.Tensor, everywhere: bool = False
    ) -> torch.Tensor | None:
        """The whole average of tensor ``k`` (shape and strides of ``like``, ``piece``'s dtype), whose piece on this
        rank is ``piece`` (empty where this rank holds none): on rank 0, or with ``everywhere`` on every rank;
        None on the others. Each piece is sent by the rank holding it (point to point: each element travels once;
        ``everywhere``: broadcast). Collective: every rank calls, for the same tensors in one order."""
        device = like.device  # where the backend communicates (the model's device: NCCL sends no host tensors)
        receives = everywhere or self.rank == 0
        whole = torch.empty_strided(like.shape, like.stride(), dtype=piece.dtype, device=device) if receives else None
        view = flat(whole) if whole is not None else None
        for r, a, b in self.owners(k):
            if r == self.rank:
                data = piece.to(device)
                if view is not None:
                    view[a:b].copy_(data)
                if view is not None and everywhere:
                    dist.broadcast(view[a:b], src=r)
                elif r != 0:
                    dist.send(data.contiguous(), dst=0)
            elif everywhere:
                assert view is not None
                dist.broadcast(view[a:b], src=r)
            elif self.rank == 0:
                assert view is not None
                dist.recv(view[a:b], src=r)
        return whole
