"""One group of an EMA: a model's tensors of one (kind, device, dtype) and their average in one flat buffer.

``kind`` is ``"parameters"``, ``"buffers"`` (both averaged) or ``"copied"`` (integer buffers, and
floating-point ones with ``buffers="copy"``). Each storage mode is a subclass with its own update:

- :class:`~emakit.storage.inplace.InPlaceGroup`: the average has the tensors' dtype and device; an
  update is one ``torch._foreach_lerp_`` over the model's tensors where they are.
- :class:`~emakit.storage.cast.CastGroup`: the average has another dtype (fp32 of bf16 weights) or
  device (offloaded to the CPU); an update casts or moves a chunk at a time.
- :class:`~emakit.storage.bound.BoundGroup` (``flatten_model=True``): the model's tensors live in one
  flat buffer; an update is one ``lerp_``, a parameter swap exchanges storage pointers.

Every group reaches the model's data through :mod:`emakit.storage.sharded`: ``targets`` (what a swap
writes and checks: a DTensor's local shard, a ZeRO-3 partition, else the tensor) and ``sources`` (what an
update reads: the same, except ZeRO-3's fp32 master partition). After writing the targets the engine is told
(:func:`~emakit.storage.sharded.after_write`: ZeRO-3 gathers its whole parameters anew); a copy of the average into
the model reaches the optimizer's master copies too (ZeRO-3's sources, ZeRO-1/2's fragments). Writes the engine
would lose are refused before any group writes (:meth:`Group.check_writable`: FSDP1 units unsharded).

Swaps, unless a mode does better, *park*: the model's values are copied aside and the average
copied in; the average itself is never written while swapped in. On the way out every parameter is
compared bit for bit with what was put in (:mod:`emakit.storage.write_check`), then the training
weights are copied back. Buffers are not compared: a train-mode forward legitimately updates
BatchNorm statistics, and the parked copy undoes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from emakit.storage.layout import (
    ALIGN_BYTES,
    CHUNK_BYTES,
    Views,
    aligned_offsets,
    chunk_limit,
    chunk_ranges,
    own_storage,
    park,
)
from emakit.storage.sharded import (
    after_write,
    before_write,
    gathered,
    has_master_apart,
    is_sharded,
    local,
    partitioning,
    source,
    write_masters,
)
from emakit.storage.write_check import WriteCheck

__all__ = ["Group"]


class Group:
    """The model's tensors of one (kind, device, dtype) and their average; subclasses say how an update reads them.

    ``writes_reach_average``: whether a write into the model during a swap lands in the average (a
    pointer exchange) rather than in a copy of it that the swap discards.

    Args:
        kind: ``"parameters"``, ``"buffers"`` or ``"copied"``.
        named: ``(name, tensor)`` of the model, all of one kind, and of one device and dtype of their
            targets and of their sources.
        ema_dtype, ema_device: the average's (normalised device).
        start: the average's starting values by name (a carried or loaded average), else the tensors' own.
    """

    writes_reach_average = False

    @torch.no_grad()
    def __init__(
        self,
        kind: str,
        named: list[tuple[str, torch.Tensor]],
        ema_dtype: torch.dtype,
        ema_device: torch.device,
        start: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.kind = kind
        self.names = [name for name, _ in named]
        self.tensors = [tensor for _, tensor in named]  # the model's own Parameter and buffer objects
        self._resolve()
        data = self.targets
        self.dtype, self.device = data[0].dtype, data[0].device  # the targets': parked and checked in these
        self.source_dtype, self.source_device = self.sources[0].dtype, self.sources[0].device
        widest = max(torch.empty((), dtype=d).element_size() for d in (self.dtype, ema_dtype))
        self.row = max(1, ALIGN_BYTES // widest)  # every slice starts on a multiple of this many elements
        self.offsets, total = self._offsets(data)
        self.views = Views(data)  # how each tensor lies in a flat buffer of this layout
        self.pinned = ema_device.type == "cpu" and self.device.type == "cuda"  # offloaded: in pinned host memory
        self._prepare(total)
        self.ema_flat = torch.zeros(total, dtype=ema_dtype, device=ema_device, pin_memory=self.pinned)
        self.averages = [own_storage(v) for v in self.views.views(self.ema_flat, self.offsets)]
        torch._foreach_copy_(self.averages, self._starting_values(start))
        numels = [d.numel() for d in data]
        self.chunks = chunk_ranges(self.offsets, numels, chunk_limit(total, self.ema_flat.element_size()))
        self.parked: list[list[torch.Tensor]] | None = None  # the model's own values while swapped in
        self.swapped = False
        self._write_check: WriteCheck | None = None

    def _offsets(self, data: list[torch.Tensor]) -> tuple[list[int], int]:
        """Where each of ``data``'s averages starts in ``ema_flat``, and its length: 64-byte aligned slices."""
        return aligned_offsets(data, self.row)

    def _starting_values(self, start: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """What the averages start from: ``start``'s data (a carried or loaded average), else what they follow."""
        return [local(start[n]) for n in self.names] if start is not None else self.sources

    def _prepare(self, total: int) -> None:
        """Work a mode does before the average is allocated (binding the model keeps the peak low)."""

    def _resolve(self) -> None:
        """Find this process's data of the model's tensors (:mod:`emakit.storage.sharded`)."""
        self.sharded = any(map(is_sharded, self.tensors))
        self.targets = list(map(local, self.tensors)) if self.sharded else self.tensors  # what a swap writes
        self.sources = list(map(source, self.tensors)) if self.sharded else self.tensors  # what an update reads
        self.distinct_sources = any(s is not t for s, t in zip(self.sources, self.targets))  # ZeRO-3's masters
        self.sharded_tensors = [t for t in self.tensors if is_sharded(t)] if self.sharded else []
        self.masters_apart = [i for i, t in enumerate(self.tensors) if has_master_apart(t)]  # ZeRO-1/2's fp32 copies

    def follow(self, tensors: list[torch.Tensor]) -> None:
        """Take the model's current tensor objects (same names, shapes, dtypes, devices) in place of the old ones."""
        self.tensors = tensors
        self._resolve()
        self._write_check = None

    def memory(self) -> list[torch.Tensor]:
        """The tensors an update reads or writes, as allocated (for an asynchronous update to keep alive)."""
        return [*self.targets, *(self.sources if self.distinct_sources else ()), self.ema_flat]

    @property
    def nbytes(self) -> int:
        return self.ema_flat.untyped_storage().nbytes()

    # ---------------------------------------------------------------- updating
    def update(self, weight: float) -> None:
        """``average += weight * (model - average)``; a copied group takes the model's values."""
        if self.kind == "copied":
            self.copy_from_model()
        else:
            self._lerp(weight)

    def _lerp(self, weight: float) -> None:
        raise NotImplementedError

    def stage(self) -> None:
        """An offloaded group's (``pinned``) first half of an asynchronous update: queue the copy of the model's
        tensors into pinned host memory (no host wait). The modes that offload have it."""
        raise NotImplementedError

    def lerp_staged(self, weight: float) -> None:
        """The second half, on the host once the staged copy has landed: the average moves towards it."""
        raise NotImplementedError

    @torch.no_grad()
    def copy_from_model(self) -> None:
        torch._foreach_copy_(self.averages, self.sources)

    @torch.no_grad()
    def set_to_mean(self, others: list[Group]) -> None:
        """``average = (a_1 + ... + a_k) / k`` of ``others``' averages (same layout), a chunk at a time in float32 at
        least; a copied group takes the last one's values."""
        if self.kind == "copied":
            self.ema_flat.copy_(others[-1].ema_flat)
            return
        wide = torch.promote_types(self.ema_flat.dtype, torch.float32)
        step = max(1, CHUNK_BYTES // wide.itemsize)
        for start in range(0, self.ema_flat.numel(), step):
            chunk = slice(start, start + step)
            total = others[0].ema_flat[chunk].to(wide, copy=True)
            for other in others[1:]:
                total.add_(other.ema_flat[chunk])
            self.ema_flat[chunk].copy_(total.div_(len(others)))

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The average into the model's weights (cast to their dtype), ZeRO-3's fp32 masters included; bumps their
        autograd versions."""
        if self.distinct_sources:
            torch._foreach_copy_(self.sources, self.averages)
        self._copy_in()
        if self.masters_apart:
            write_masters([self.tensors[i] for i in self.masters_apart], [self.averages[i] for i in self.masters_apart])

    def _copy_in(self) -> None:
        """The average into the data the model's forward pass reads (a swap leaves ZeRO-3's masters alone)."""
        torch._foreach_copy_(self.targets, self.averages)
        if self.sharded_tensors:
            after_write(self.sharded_tensors)

    def check_writable(self) -> None:
        """Raise (ValueError) where a write into the model's data would be lost now (an FSDP1 unit unsharded): every
        group is asked before any writes, so that a refused swap or copy leaves everything as it was."""
        if self.sharded_tensors:
            before_write(self.sharded_tensors)

    def keep_model_buffers(self) -> None:
        """While swapped in: make the model's values (statistics measured on the average) the average's."""
        if self.kind != "parameters":
            torch._foreach_copy_(self.averages, self.targets)

    def all_finite(self) -> torch.Tensor:
        """Whether no tensor of the model holds NaN or Inf (a bool tensor on the model's device)."""
        tensors = [t for t in self.sources if t.numel()]
        if not tensors:
            return torch.tensor(True)
        largest = torch._foreach_norm(tensors, ord=float("inf"))  # max |x|: NaN and Inf survive it, nothing overflows
        return torch.stack(largest).isfinite().all()

    # ----------------------------------------------------------------- swapping
    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the average into the model's tensors; their own values are parked aside."""
        self.parked = self._park()
        self._copy_in()
        self.swapped = True

    @torch.no_grad()
    def swap_out(self) -> list[str]:
        """Give the model its own values back; returns the parameters written in place while swapped in.

        Such a write (an optimizer step, ``.data``, numpy, another process) changed the model's copy of
        the average only: the average itself is as it was, and the training weights come back unchanged.
        """
        written = []
        if self.kind == "parameters":
            if self._write_check is None:
                self._write_check = WriteCheck(self.targets)
            written = [self.names[k] for k in self._write_check.written(self.targets, self.averages)]
        assert self.parked is not None  # swapped in
        self._unpark(self.parked)
        self.parked, self.swapped = None, False
        return written

    def _park(self) -> list[list[torch.Tensor]]:
        """A copy of the model's values (:func:`~emakit.storage.layout.park`)."""
        return park(self.targets, self.views, self.offsets, self.chunks, self.ema_flat.numel())

    def _unpark(self, parked: list[list[torch.Tensor]]) -> None:
        for (i, j), views in zip(self.chunks, parked):
            torch._foreach_copy_(self.targets[i:j], views)
        if self.sharded_tensors:
            after_write(self.sharded_tensors)

    def _span_end(self, j: int) -> int:
        """Where the slice of tensors ``..j`` ends in the flat layout (the next tensor's offset, or the end)."""
        return self.offsets[j] if j < len(self.offsets) else self.ema_flat.numel()

    def note_writes(self) -> None:
        """A nested swap begins on top of this one: remember what was written so far (modes that need it)."""

    def refresh_marks(self) -> None:
        """A nested swap on top of this one ended and restored the model (modes that need it)."""

    def current_averages(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, model tensor, tensor holding the average now)``."""
        yield from zip(self.names, self.tensors, self.averages)

    def gathered(self, index: int, holder: torch.Tensor, copy: bool, everywhere: bool) -> torch.Tensor | None:
        """The full average of tensor ``index`` whose data here is ``holder`` (from :meth:`current_averages`), where
        this rank receives it (:func:`~emakit.storage.sharded.gathered`; ``everywhere``: a mode that can send it
        to every rank does). Collective for sharded tensors: every rank calls, in one order."""
        return gathered(self.tensors[index], holder, copy=copy)

    def partitioning(self) -> dict | None:
        """Whose data a state of this group holds (:func:`~emakit.storage.sharded.partitioning`), or None."""
        return partitioning(self.tensors)
