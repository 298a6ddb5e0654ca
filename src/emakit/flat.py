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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from emakit.tracked import local

__all__ = ["ALIGN_BYTES", "FlatGroup", "flat_views", "is_dense", "own_storage"]

ALIGN_BYTES = 64  # each tensor starts on a 64-byte boundary of its flat buffer
CHUNK_BYTES = 64 << 20  # the most bytes (besides one tensor) a swap or a casting update holds as a temporary
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


def _chunks(offsets: list[int], numels: list[int], limit: int) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of consecutive tensors spanning at most ``limit`` elements (or one tensor)."""
    ranges, first = [], 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets) or offsets[i] + numels[i] - offsets[first] > limit:
            ranges.append((first, i))
            first = i
    return ranges


def _bit_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per tensor, the wrapping sum of its elements' bit patterns (as integers of their size; half a copy's time).

    Any change of one element's bytes changes it.
    """
    sums = []
    for t in tensors:
        bits = torch.view_as_real(t) if t.is_complex() else t
        integers = _INT_OF_SIZE[bits.element_size()]
        sums.append(bits.view(integers).sum(dtype=integers).to(torch.int64))
    return torch.stack(sums)


def _versions(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([local(t)._version for t in tensors])


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd that ``tensors`` changed (their memory was written or exchanged behind their back)."""
    for tensor in tensors:
        torch.autograd.graph.increment_version(local(tensor))


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
    model_flat: torch.Tensor | None = None  # flatten_model: the model's tensors live here
    staging: torch.Tensor | None = None  # a copy of model_flat where the average lives elsewhere (CPU offload)
    parked: torch.Tensor | None = None  # the model's values during a parking swap
    marks: torch.Tensor | None = None  # during an exchanging swap: what shows a write into the average (below)
    swapped: bool = False
    written: set[str] = field(default_factory=set)  # seen written during this swap before a nested swap began
    sharded: bool = False  # the tensors are DTensors: work on their local shards
    cast: bool = False  # the average's dtype or device differs from the model's
    exchange: bool = False  # swaps exchange the average with the model's values (parameters, same dtype/device)

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
        offsets, total = _aligned_offsets(data, max(1, ALIGN_BYTES // widest))
        model_flat = None
        if bind:
            model_flat = torch.empty(total, dtype=dtype, device=device)
            for t, view in zip(tensors, flat_views(model_flat, tensors, offsets)):
                view.copy_(t)
                t.data = own_storage(view)  # the Parameter object stays; its memory is now a slice of model_flat
            _bump_versions(tensors)
        pin = ema_device.type == "cpu" and device.type == "cuda"
        ema_flat = torch.zeros(total, dtype=ema_dtype, device=ema_device, pin_memory=pin)
        averages = [own_storage(v) for v in flat_views(ema_flat, data, offsets)]
        sources = [local(start[name]) for name in names] if start is not None else data
        torch._foreach_copy_(averages, sources)
        cast = (dtype, device) != (ema_dtype, ema_device)
        group = cls(kind, names, tensors, ema_flat, averages, offsets, model_flat=model_flat, cast=cast)
        group.sharded = any(d is not t for d, t in zip(data, tensors))
        group.exchange = kind == "parameters" and not cast
        if bind and ema_device != device:
            group.staging = torch.empty(total, dtype=dtype, pin_memory=pin)
        return group

    def _data(self) -> list[torch.Tensor]:
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
        _bump_versions(moved)

    def all_finite(self) -> torch.Tensor:
        """Whether no tensor of the model holds NaN or Inf (a bool tensor on the model's device)."""
        if self.model_flat is not None:
            return torch.isfinite(self.model_flat).all()
        return torch.stack([torch.isfinite(t).all() for t in self._data()]).all()

    # ---------------------------------------------------------------- updating
    def update(self, weight: float) -> None:
        """``average += weight * (model - average)``; integer tensors are copied."""
        if self.kind == "copied":
            self.copy_from_model()
        elif self.model_flat is not None:
            self._flat_lerp(weight)
        elif not self.cast:
            torch._foreach_lerp_(self.averages, self._data(), weight)
        else:  # cast (fp32 average of bf16 weights) or move (average on the CPU) a chunk at a time
            for start, staged in self._staged(self._data()):
                self.ema_flat[start : start + staged.numel()].lerp_(staged, weight)

    def _chunked(self, data: list[torch.Tensor]) -> Iterator[tuple[int, int, torch.Tensor, list[torch.Tensor]]]:
        """``(i, j, flat, views)`` per chunk of tensors ``i..j``: a temporary flat buffer of the average's
        dtype and device spanning their slices of ``ema_flat``, and its views shaped like them."""
        numels = [t.numel() for t in data]
        ranges = _chunks(self.offsets, numels, max(1, CHUNK_BYTES // self.ema_flat.element_size()))
        ends = [self.offsets[j - 1] + numels[j - 1] for _, j in ranges]
        temporary = torch.empty(
            max(end - self.offsets[i] for (i, _), end in zip(ranges, ends)),
            dtype=self.ema_flat.dtype,
            device=self.ema_flat.device,
        )
        for (i, j), end in zip(ranges, ends):
            base = self.offsets[i]
            views = flat_views(temporary, data[i:j], [o - base for o in self.offsets[i:j]])
            yield i, j, temporary[: end - base], views

    def _staged(self, data: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, flat)``: chunks of the model's tensors copied into the average's dtype and device."""
        for i, j, flat, views in self._chunked(data):
            torch._foreach_copy_(views, data[i:j])
            yield self.offsets[i], flat

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
            torch._foreach_copy_(self.averages, self._data())

    def copy_to_model(self) -> None:
        if self.model_flat is not None:
            self.model_flat.copy_(self.ema_flat)
            _bump_versions(self.tensors)
        else:
            torch._foreach_copy_(self._data(), self.averages)

    # ----------------------------------------------------------------- swapping
    @property
    def _exchanges_pointers(self) -> bool:
        return self.exchange and self.model_flat is not None and _HAS_POINTER_EXCHANGE

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
            self.marks = _versions(self.tensors)
        else:
            self.marks = _bit_sums(self.averages)
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
                _bump_versions(self.tensors)
            else:
                data = self._data()
                torch._foreach_copy_(data, flat_views(self.parked, data, self.offsets))
        elif self._exchanges_pointers:
            self.note_writes()
            self._exchange_pointers()
        else:
            self._exchange_contents()
            written = _bit_sums(self.averages) != self.marks
            self.written.update(name for name, w in zip(self.names, written.tolist()) if w)
        changed = sorted(self.written, key=self.names.index)
        self.parked, self.marks, self.written = None, None, set()
        self.swapped = False
        return changed

    def note_writes(self) -> None:
        """Remember the tensors written since the version marks were taken (a pointer exchange only)."""
        if self.swapped and self._exchanges_pointers:
            moved = (_versions(self.tensors) != self.marks).tolist()
            self.written.update(name for name, m in zip(self.names, moved) if m)

    def refresh_marks(self) -> None:
        """Take the version marks anew: a nested swap of another EMA wrote and restored these tensors."""
        if self.swapped and self._exchanges_pointers:
            self.marks = _versions(self.tensors)

    def _park(self) -> torch.Tensor:
        data = self._data()
        parked = torch.empty(self.ema_flat.numel(), dtype=data[0].dtype, device=data[0].device)
        torch._foreach_copy_(flat_views(parked, data, self.offsets), data)
        return parked

    def _exchange_pointers(self) -> None:
        """Exchange the storage pointers of the model's tensors and their averages: O(1) per tensor, no data moved."""
        collections.deque(
            map(torch.UntypedStorage._swap_data_ptr_, _storages(self.tensors), _storages(self.averages)), 0
        )
        _bump_versions(self.tensors)

    def _exchange_contents(self) -> None:
        """Exchange the model's values with the averages, a chunk at a time (its own inverse)."""
        data = self._data()
        for i, j, flat, views in self._chunked(data):
            flat.copy_(self.ema_flat[self.offsets[i] : self.offsets[i] + flat.numel()])
            torch._foreach_copy_(self.averages[i:j], data[i:j])
            torch._foreach_copy_(data[i:j], views)

    def current_averages(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, model tensor, tensor holding the average now)``: the model's own while exchanged in."""
        holders = self._data() if self.swapped and self.exchange else self.averages
        yield from zip(self.names, self.tensors, holders)


def _storages(tensors: Sequence[torch.Tensor]) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tensors]
