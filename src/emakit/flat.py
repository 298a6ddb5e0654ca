"""One group of an EMA: a model's tensors of one (kind, device, dtype) and their average in one flat buffer.

The average of each tensor is a slice of the group's flat buffer, presented as a tensor with its
*own* storage object (:func:`own_storage`): it serializes, copies and pickles as its own bytes.

Per group, with ``w = 1 - smoothing``, in the default mode (the model's tensors stay where they are)::

    update:    torch._foreach_lerp_(averages, model_tensors, w)     one pass, no Python loop per tensor
    swap in:   exchange contents, chunk by chunk (parameters)        the average now in the model's memory,
               or park a copy and copy the average in (buffers)      the training weights in the EMA's
    swap out:  the same exchange again / copy the parked values back

With ``flatten_model=True`` the model's tensors are *bound*: each one's memory becomes its slice
of a flat model buffer (still with its own storage object), so an update is one
``ema_flat.lerp_(model_flat, w)`` and a parameter swap exchanges storage pointers, tensor by
tensor, moving no data.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from emakit.tracked import local

__all__ = ["ALIGN_BYTES", "FlatGroup", "flat_views", "is_dense", "own_storage"]

ALIGN_BYTES = 64  # each tensor starts on a 64-byte boundary of its flat buffer
CHUNK_BYTES = 16 << 20  # the most bytes (besides one tensor) a swap or a casting update holds as a temporary
CHUNK_SHARE = 4  # and at most 1/4 of the group's bytes: evaluation then holds under 1.3x the weights
_HAS_POINTER_EXCHANGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")  # torch >= 2.12
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements of its storage, in any dim order."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def flat_views(flat: torch.Tensor, like: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, at ``offsets``; in their memory format where they are dense."""
    return [
        flat.as_strided(t.shape, t.stride() if is_dense(t) else torch.empty(t.shape, device="meta").stride(), o)
        for t, o in zip(like, offsets)
    ]


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view`` as a tensor with its own storage object: the view's bytes only, aliasing them.

    Serializers (``torch.save``, safetensors), ``deepcopy`` and pickling then see this tensor's
    bytes, not the whole flat buffer it is a slice of; the buffer stays alive while it lives.
    """
    return torch.from_dlpack(view.detach())


def _aligned_offsets(tensors: Sequence[torch.Tensor], step: int) -> tuple[list[int], int]:
    """Offsets that start each tensor on a multiple of ``step`` elements, and the total length."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // step) * step
    return offsets, total


def _chunk_ranges(offsets: list[int], numels: list[int], limit: int) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of consecutive tensors spanning at most ``limit`` elements (or one tensor)."""
    ranges, first = [], 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets) or offsets[i] + numels[i] - offsets[first] > limit:
            ranges.append((first, i))
            first = i
    return ranges


def _bit_sums(flat: torch.Tensor, row: int, starts: list[int]) -> torch.Tensor:
    """Per tensor of ``flat`` (starting at ``starts``, ending at the next start or the end), the wrapping sum of its
    elements' bit patterns: a change of any element changes it.

    ``flat`` is read once as integers of its element size, in rows of ``row`` elements (tensors
    start on row boundaries, padding is zeros); the rows' prefix sums at the tensors' first rows
    give every tensor's sum in a few kernels, with no loop per tensor and temporaries of 1/``row``
    of ``flat``.
    """
    size = min(flat.element_size(), 8)  # complex128: pairs of int64
    integers = flat.view(_INT_OF_SIZE[size])
    rows = integers.view(-1, row * flat.element_size() // size).sum(dim=1, dtype=integers.dtype)
    prefix = torch.cat([rows.new_zeros(1), rows.cumsum(0, dtype=integers.dtype)])
    bounds = torch.tensor([*starts, flat.numel()], device=flat.device) // row
    return (prefix[bounds[1:]] - prefix[bounds[:-1]]).cpu()


try:  # torch >= 2.5 bumps a list of tensors in one call
    torch.autograd.graph.increment_version([])
    _increment_versions = torch.autograd.graph.increment_version
except (TypeError, AttributeError, RuntimeError):

    def _increment_versions(tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)


_version = operator.attrgetter("_version")


def _versions(tensors: Sequence[torch.Tensor]) -> list[int]:
    return list(map(_version, tensors))


@dataclass
class _Temporary:
    """A flat scratch buffer for a group, and per chunk of tensors its views shaped like them."""

    flat: torch.Tensor
    views: list[list[torch.Tensor]]


@dataclass
class FlatGroup:
    """The model's tensors of one (kind, device, dtype) and their average.

    ``kind`` is ``"parameters"``, ``"buffers"`` (both averaged) or ``"copied"`` (integer buffers).
    Parameters whose average has their dtype and device are swapped by *exchange*; everything
    else by *parking*: the model's values are copied aside and the average copied in, so whatever
    runs during a swap (a train-mode forward updating BatchNorm statistics) never reaches the average.
    """

    kind: str
    names: list[str]
    tensors: list[torch.Tensor]  # the model's own Parameter and buffer objects
    ema_flat: torch.Tensor
    averages: list[torch.Tensor]  # each tensor's average: its slice of ema_flat, with its own storage
    offsets: list[int]
    row: int  # the alignment of every tensor's slice, in elements
    chunks: list[tuple[int, int]]  # tensor ranges [i, j) that swaps and casting updates handle at once
    sharded: bool  # the tensors are DTensors: work on their local shards
    cast: bool  # the average's dtype or device differs from the model's
    exchange: bool  # swaps exchange the average with the model's values (parameters, same dtype/device)
    model_flat: torch.Tensor | None = None  # flatten_model: the model's tensors live here
    staging: torch.Tensor | None = None  # a copy of model_flat where the average lives elsewhere (CPU offload)
    storages: tuple[list, list] | None = None  # flatten_model: the tensors' and the averages' storage objects
    parked: torch.Tensor | None = None  # the model's values during a parking swap
    temporary: _Temporary | None = None  # the scratch buffer of an exchanging swap
    marks: torch.Tensor | list[int] | None = None  # during an exchanging swap: what shows a write into the average
    written: set[str] = field(default_factory=set)  # seen written during this swap before a nested swap began
    swapped: bool = False

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        kind: str,
        named: list[tuple[str, torch.Tensor]],
        ema_dtype: torch.dtype,
        ema_device: torch.device,
        bind: bool,
        start: dict[str, torch.Tensor] | None,
    ) -> FlatGroup:
        """Allocate the average (from ``start`` by name, else from the tensors); bind the tensors if ``bind``.

        Binding comes first and frees each old tensor as it goes, so it peaks at the model, its flat
        buffer and one tensor; the average is allocated after.
        """
        names = [name for name, _ in named]
        tensors = [t for _, t in named]
        data = [local(t) for t in tensors]  # what this process holds: a shard of a DTensor
        dtype, device = data[0].dtype, data[0].device
        widest = max(torch.empty((), dtype=d).element_size() for d in (dtype, ema_dtype))
        row = max(1, ALIGN_BYTES // widest)
        offsets, total = _aligned_offsets(data, row)
        model_flat = None
        if bind:
            model_flat = torch.empty(total, dtype=dtype, device=device)
            for t, view in zip(tensors, flat_views(model_flat, tensors, offsets)):
                view.copy_(t)
                t.data = own_storage(view)  # the Parameter object stays; its memory is now a slice of model_flat
            _increment_versions(tensors)
        pin = ema_device.type == "cpu" and device.type == "cuda"
        ema_flat = torch.zeros(total, dtype=ema_dtype, device=ema_device, pin_memory=pin)
        averages = [own_storage(v) for v in flat_views(ema_flat, data, offsets)]
        sources = [local(start[name]) for name in names] if start is not None else data
        torch._foreach_copy_(averages, sources)
        limit = min(CHUNK_BYTES, max(1 << 20, total * ema_flat.element_size() // CHUNK_SHARE))
        cast = (dtype, device) != (ema_dtype, ema_device)
        group = cls(
            kind,
            names,
            tensors,
            ema_flat,
            averages,
            offsets,
            row=row,
            chunks=_chunk_ranges(offsets, [t.numel() for t in data], max(1, limit // ema_flat.element_size())),
            sharded=any(d is not t for d, t in zip(data, tensors)),
            cast=cast,
            exchange=kind == "parameters" and not cast,
            model_flat=model_flat,
        )
        if bind:
            group.storages = (_storages(tensors), _storages(averages))
            if ema_device != device:
                group.staging = torch.empty(total, dtype=dtype, pin_memory=pin)
        return group

    def local_tensors(self) -> list[torch.Tensor]:
        """The model's tensors as this process holds them (a DTensor's local shard)."""
        return [local(t) for t in self.tensors] if self.sharded else self.tensors

    @torch.no_grad()
    def rebind(self) -> None:
        """Put bound tensors that now live elsewhere (re-pointed or replaced) back into their slices, values kept."""
        moved = []
        for tensor, slot in zip(self.tensors, flat_views(self.model_flat, self.averages, self.offsets)):
            if tensor.data_ptr() != slot.data_ptr():
                slot.copy_(tensor)
                tensor.data = own_storage(slot)
                moved.append(tensor)
        _increment_versions(moved)
        self.storages = (_storages(self.tensors), self.storages[1])

    def all_finite(self) -> torch.Tensor:
        """Whether no tensor of the model holds NaN or Inf (a bool tensor on the model's device)."""
        if self.model_flat is not None:
            return torch.isfinite(self.model_flat).all()
        return torch.stack([torch.isfinite(t).all() for t in self.local_tensors()]).all()

    # ---------------------------------------------------------------- updating
    def update(self, weight: float) -> None:
        """``average += weight * (model - average)``; integer tensors are copied."""
        if self.kind == "copied":
            self.copy_from_model()
        elif self.model_flat is not None:
            self._flat_lerp(weight)
        elif not self.cast:
            torch._foreach_lerp_(self.averages, self.local_tensors(), weight)
        else:  # cast (fp32 average of bf16 weights) or move (average on the CPU) a chunk at a time
            data = self.local_tensors()
            temporary = self._temporary()
            for (i, j), views in zip(self.chunks, temporary.views):
                torch._foreach_copy_(views, data[i:j])
                start, stop = self._span(i, j)
                self.ema_flat[start:stop].lerp_(temporary.flat[: stop - start], weight)

    def _span(self, i: int, j: int) -> tuple[int, int]:
        """The slice of ``ema_flat`` that tensors ``i..j`` occupy (their padding included)."""
        return self.offsets[i], self.offsets[j] if j < len(self.offsets) else self.ema_flat.numel()

    def _temporary(self) -> _Temporary:
        """A scratch buffer of the average's dtype and device for the largest chunk, with views for every chunk."""
        spans = [self._span(i, j) for i, j in self.chunks]
        flat = torch.empty(
            max(stop - start for start, stop in spans), dtype=self.ema_flat.dtype, device=self.ema_flat.device
        )
        views = [
            [
                flat.as_strided(a.shape, a.stride(), offset - start)
                for a, offset in zip(self.averages[i:j], self.offsets[i:j])
            ]
            for (i, j), (start, _) in zip(self.chunks, spans)
        ]
        return _Temporary(flat, views)

    def _flat_lerp(self, weight: float) -> None:
        source = self.model_flat
        if self.staging is not None:  # average on the host: one bulk transfer, then lerp there
            self.staging.copy_(source)
            source = self.staging
        if source.dtype == self.ema_flat.dtype:
            self.ema_flat.lerp_(source, weight)
            return
        step = max(1, CHUNK_BYTES // self.ema_flat.element_size())
        for start in range(0, self.ema_flat.numel(), step):
            self.ema_flat[start : start + step].lerp_(source[start : start + step].to(self.ema_flat.dtype), weight)

    def copy_from_model(self) -> None:
        if self.model_flat is not None:
            self.ema_flat.copy_(self.model_flat)
        else:
            torch._foreach_copy_(self.averages, self.local_tensors())

    def copy_to_model(self) -> None:
        if self.model_flat is not None:
            self.model_flat.copy_(self.ema_flat)
            _increment_versions(self.tensors)
        else:
            torch._foreach_copy_(self.local_tensors(), self.averages)

    # ----------------------------------------------------------------- swapping
    @property
    def _exchanges_pointers(self) -> bool:
        return self.exchange and self.model_flat is not None and _HAS_POINTER_EXCHANGE

    def _bit_sums(self) -> torch.Tensor:
        """The averages' bit sums (see :func:`_bit_sums`), a chunk at a time: temporaries stay small."""
        sums = []
        for i, j in self.chunks:
            start, stop = self._span(i, j)
            sums.append(_bit_sums(self.ema_flat[start:stop], self.row, [o - start for o in self.offsets[i:j]]))
        return torch.cat(sums)

    def swap_in(self) -> None:
        """Put the average into the model's tensors.

        An exchange remembers what will show a write into the average during the swap: the
        averages' bit sums (half a copy's time); under a pointer exchange (flatten_model), which
        must stay O(1), autograd's version counters of the model's tensors.
        """
        if not self.exchange:
            self.parked = self.model_flat.clone() if self.model_flat is not None else self._park()
            self.copy_to_model()
        elif self._exchanges_pointers:
            self._exchange_pointers()
            self.marks = _versions(self.local_tensors())
        else:
            self.marks = self._bit_sums()
            self.temporary = self._temporary()
            self._exchange_contents()
        self.swapped = True

    def swap_out(self) -> list[str]:
        """Give the model its own values back; returns the names of exchanged tensors written to during the swap.

        Such a write (an optimizer step, ``.data.add_``, numpy, another process) went into the
        model's memory, which held the average.
        """
        if not self.exchange:
            if self.model_flat is not None:
                self.model_flat.copy_(self.parked)
                _increment_versions(self.tensors)
            else:
                data = self.local_tensors()
                torch._foreach_copy_(data, flat_views(self.parked, self.averages, self.offsets))
        elif self._exchanges_pointers:
            self.note_writes()
            self._exchange_pointers()
        else:
            self._exchange_contents()
            written = (self._bit_sums() != self.marks).tolist()
            self.written.update(name for name, w in zip(self.names, written) if w)
        changed = sorted(self.written, key=self.names.index)
        self.parked, self.temporary, self.marks, self.written = None, None, None, set()
        self.swapped = False
        return changed

    def note_writes(self) -> None:
        """Remember the tensors written since the version marks were taken (a pointer exchange only)."""
        if self.swapped and self._exchanges_pointers:
            versions = _versions(self.local_tensors())
            if versions != self.marks:
                self.written.update(name for name, v, m in zip(self.names, versions, self.marks) if v != m)

    def refresh_marks(self) -> None:
        """Take the version marks anew: a nested swap of another EMA wrote and restored these tensors."""
        if self.swapped and self._exchanges_pointers:
            self.marks = _versions(self.local_tensors())

    def _park(self) -> torch.Tensor:
        data = self.local_tensors()
        parked = torch.empty(self.ema_flat.numel(), dtype=data[0].dtype, device=data[0].device)
        torch._foreach_copy_(flat_views(parked, self.averages, self.offsets), data)
        return parked

    def _exchange_pointers(self) -> None:
        """Exchange the storage pointers of the model's tensors and their averages: O(1) per tensor, no data moved."""
        collections.deque(map(torch.UntypedStorage._swap_data_ptr_, *self.storages), 0)
        _increment_versions(self.tensors)

    def _exchange_contents(self) -> None:
        """Exchange the model's values with the averages, a chunk at a time through the scratch buffer."""
        data, temporary = self.local_tensors(), self.temporary
        for (i, j), views in zip(self.chunks, temporary.views):
            start, stop = self._span(i, j)
            temporary.flat[: stop - start].copy_(self.ema_flat[start:stop])
            torch._foreach_copy_(self.averages[i:j], data[i:j])
            torch._foreach_copy_(data[i:j], views)

    def current_averages(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, model tensor, tensor holding the average now)``: the model's own while exchanged in."""
        holders = self.local_tensors() if self.swapped and self.exchange else self.averages
        yield from zip(self.names, self.tensors, holders)


def _storages(tensors: Sequence[torch.Tensor]) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tensors]
