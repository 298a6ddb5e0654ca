"""``shard_over_ranks=True``: a group of whole (data-parallel) parameters whose average each rank keeps 1/N of.

The split (:mod:`emakit.storage.ranks`): the group's tensors laid end to end in memory order, rank ``r`` of ``n``
keeping elements ``[r * s, min((r + 1) * s, total))``, ``s = ceil(total / n)``. What each operation does here::

    update         this rank's pieces (views of the model's memory) lerped into its slice: the modes' own update
                   (InPlaceGroup's _foreach_lerp_, CastGroup's chunked casts) on the pieces; no communication
    swap in        the model's whole values parked (local), every rank's slice all-gathered into the model
                   (one all_gather_single per chunk of at most 16 MiB)
    swap out       this rank's pieces compared byte for byte with its slice; one all-reduce of a flag per tensor
                   tells every rank which were written; the parked values copied back (local, bit for bit)
    copy to model  every rank's slice all-gathered into the model (train_with_ema_weights)
    state          this rank's piece of each tensor (empty where it holds none) and a record of whose they are
    exports        one tensor at a time, its pieces sent to rank 0 (or to every rank: ema_model)

A write inside a swap is seen by the rank whose slice it falls in, and the flag names it on every rank; a write
made on some ranks only into another rank's slice is not seen (it is still undone: the parked training weights
come back bit for bit, and the average is never written during a swap).

Only parameters are split: buffers (BatchNorm statistics, which differ across ranks under DDP without
SyncBatchNorm) stay whole on every rank, each averaging its own, as without ``shard_over_ranks``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from emakit.storage.cast import CastGroup
from emakit.storage.group import Group
from emakit.storage.inplace import InPlaceGroup
from emakit.storage.layout import Views, aligned_offsets, chunk_limit, chunk_ranges, park
from emakit.storage.ranks import RankSlices, flat, ranks, record
from emakit.storage.sharded import has_master_apart
from emakit.storage.write_check import WriteCheck

__all__ = ["SLICED", "SlicedCastGroup", "SlicedInPlaceGroup"]


class RankSliced(Group):
    """A group whose average this rank keeps a slice of: pieces updated in place, swaps and copies gathered.

    Mixed in before the mode that updates the pieces (:class:`SlicedInPlaceGroup`, :class:`SlicedCastGroup`).
    """

    slices: RankSlices
    whole: list[torch.Tensor]
    _whole_plan: tuple[Views, list[int], list[tuple[int, int]], int] | None
    _empty: torch.Tensor | None = None

    def _resolve(self) -> None:
        place = ranks()
        if place is None:
            raise RuntimeError("shard_over_ranks splits a group over the ranks of an initialized process group")
        self.slices = RankSlices(self.names, self.tensors, *place)
        self.whole = [flat(t) for t in self.tensors]  # each tensor's memory, 1-D: what swaps write
        pieces = [self.whole[k][a:b] for k, a, b in self.slices.pieces]
        self.targets = self.sources = pieces or [self.whole[0][:0]]  # a rank beyond a small group: one empty piece
        self.sharded, self.distinct_sources, self.sharded_tensors = False, False, []
        self.masters_apart = [i for i, t in enumerate(self.tensors) if has_master_apart(t)]
        self._whole_plan = None

    def _offsets(self, data: list[torch.Tensor]) -> tuple[list[int], int]:
        """The pieces end to end (no padding: they are this rank's slice of the flat layout), ``s`` in all."""
        offsets, total = [], 0
        for piece in data:
            offsets.append(total)
            total += piece.numel()
        return offsets, self.slices.size

    def _starting_values(self, start: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """This rank's pieces of ``start``'s whole tensors (a carried average, gathered), else the model's."""
        if start is None or not self.slices.pieces:
            return self.sources
        values = []
        for k, a, b in self.slices.pieces:
            model, value = self.tensors[k], start[self.names[k]]
            if value.stride() != model.stride() or value.shape != model.shape:  # laid out as the model's memory
                value = torch.empty_like(model, dtype=value.dtype, device=value.device).copy_(value)
            values.append(flat(value)[a:b])
        return values

    def current_averages(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, model tensor, this rank's piece of its average)``: an empty tensor where this rank holds none."""
        if self._empty is None:
            self._empty = torch.empty(0, dtype=self.ema_flat.dtype, device=self.ema_flat.device)
        for k, (name, tensor) in enumerate(zip(self.names, self.tensors)):
            i = self.slices.piece_of.get(k)
            yield name, tensor, self.averages[i] if i is not None else self._empty

    def gathered(self, index: int, holder: torch.Tensor, copy: bool, everywhere: bool) -> torch.Tensor | None:
        """Tensor ``index``'s whole average on rank 0 (``everywhere``: on every rank), None elsewhere. Collective."""
        return self.slices.gather_tensor(index, holder, self.tensors[index], everywhere=everywhere)

    def partitioning(self) -> dict:
        return record(self.slices.rank, self.slices.world, self.slices.total)

    def all_finite(self) -> torch.Tensor:
        """Whether the model's whole tensors are free of NaN and Inf (every rank holds them: no communication, and
        every rank decides alike)."""
        tensors = [t for t in self.whole if t.numel()]
        if not tensors:
            return torch.tensor(True)
        return torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).isfinite().all()

    # ------------------------------------------------------------ into the model
    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Every rank's slice into the model's whole tensors (collective). Bumps their autograd versions."""
        if self.masters_apart:
            name = self.names[self.masters_apart[0]]
            raise ValueError(
                f"shard_over_ranks cannot copy the average into {name!r}: an optimizer keeps an fp32 master fragment "
                "of it apart (DeepSpeed ZeRO-1/2), which would need every tensor's whole average on every rank; "
                "train_with_ema_weights=True is supported with shard_over_ranks under DDP, not under ZeRO-1/2"
            )
        self._copy_in()

    def _copy_in(self) -> None:
        self.slices.gather_into(self.ema_flat, self.tensors)

    def _plan(self) -> tuple[Views, list[int], list[tuple[int, int]], int]:
        """How the whole tensors lie in a park (a swap copies them aside, locally)."""
        if self._whole_plan is None:
            offsets, total = aligned_offsets(self.tensors, self.row)
            limit = chunk_limit(total, self.tensors[0].element_size())
            chunks = chunk_ranges(offsets, [t.numel() for t in self.tensors], limit)
            self._whole_plan = (Views(self.tensors), offsets, chunks, total)
        return self._whole_plan

    def _park(self) -> list[list[torch.Tensor]]:
        views, offsets, chunks, total = self._plan()
        return park(self.tensors, views, offsets, chunks, total)

    def _unpark(self, parked: list[list[torch.Tensor]]) -> None:
        for (i, j), copies in zip(self._plan()[2], parked):
            torch._foreach_copy_(self.tensors[i:j], copies)

    @torch.no_grad()
    def swap_out(self) -> list[str]:
        """The parked training weights back (bit for bit); returns the parameters written while swapped in, on
        every rank: each rank compares its pieces, one all-reduce of a flag per tensor tells them all."""
        flags = torch.zeros(len(self.names), dtype=torch.int32, device=self.device)
        if self.slices.pieces:
            if self._write_check is None:
                self._write_check = WriteCheck(self.targets)
            for i in self._write_check.written(self.targets, self.averages):
                flags[self.slices.pieces[i][0]] = 1
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        assert self.parked is not None  # swapped in
        self._unpark(self.parked)
        self.parked, self.swapped = None, False
        return [self.names[k] for k in flags.nonzero().flatten().tolist()]


class SlicedInPlaceGroup(RankSliced, InPlaceGroup):
    """This rank's slice of an average of the tensors' dtype and device: one ``_foreach_lerp_`` over its pieces."""


class SlicedCastGroup(RankSliced, CastGroup):
    """This rank's slice of an average of another dtype (fp32 of bf16) or device: chunked casts of its pieces."""


SLICED: dict[type[Group], type[Group]] = {InPlaceGroup: SlicedInPlaceGroup, CastGroup: SlicedCastGroup}
