"""``flatten_model=True``: the model's tensors bound into one flat buffer, so an update is one kernel.

Binding copies each tensor into its slice of a flat model buffer and re-points it there
(``tensor.data = own-storage slice``; the ``Parameter`` objects stay, each keeps a storage object of
its own). Then, with ``w = 1 - smoothing``::

    update:    ema_flat.lerp_(model_flat, w)                              one kernel per group
    swap:      exchange the storage pointers of each parameter and its average (torch >= 2.12),
               O(1) per tensor, no data moved; writes inside are seen by autograd's version counters
    otherwise: park and copy, as every group does (buffers, a cast average, older torch)

The flat model buffer starts zeroed: its alignment padding is never garbage (a NaN there would make
``skip_nonfinite`` skip every update). An average on another device goes through a staging copy of
the model buffer on that device.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import torch

from emakit.storage.group import Group
from emakit.storage.layout import (
    CHUNK_BYTES,
    increment_versions,
    own_storage,
    storages,
    versions,
)

__all__ = ["HAS_POINTER_EXCHANGE", "BoundGroup"]

HAS_POINTER_EXCHANGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")  # torch >= 2.12


class BoundGroup(Group):
    """The model's tensors of one (kind, device, dtype) living in one flat buffer, and their average."""

    def _prepare(self, total: int) -> None:
        """Bind: copy each tensor into its slice and re-point it there, freeing the old memory as it goes."""
        self.model_flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        for t, view in zip(self.tensors, self.views.views(self.model_flat, self.offsets)):
            view.copy_(t)
            t.data = own_storage(view)  # the Parameter object stays; its memory is now a slice of model_flat
        increment_versions(self.tensors)

    @torch.no_grad()
    def __init__(
        self,
        kind: str,
        named: list[tuple[str, torch.Tensor]],
        ema_dtype: torch.dtype,
        ema_device: torch.device,
        start: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(kind, named, ema_dtype, ema_device, start)
        self.storages = (storages(self.tensors), storages(self.averages))
        self.staging = None  # a copy of model_flat on the average's device, when it lives elsewhere
        if self.ema_flat.device != self.device:
            self.staging = torch.zeros(
                self.ema_flat.numel(), dtype=self.dtype, device=self.ema_flat.device, pin_memory=self.pinned
            )
        same_place = (self.ema_flat.dtype, self.ema_flat.device) == (self.dtype, self.device)
        self.exchanges_pointers = self.kind == "parameters" and same_place and HAS_POINTER_EXCHANGE
        self.writes_reach_average = self.exchanges_pointers
        self.marks: list[int] | None = None  # version counters at swap-in (pointer exchange)
        self.written: set[str] = set()  # seen written during this swap before a nested swap began

    @torch.no_grad()
    def follow(self, tensors: list[torch.Tensor]) -> None:
        """Take the model's tensor objects; any now living elsewhere go back into their slices, values kept."""
        super().follow(tensors)
        moved = []
        for tensor, slot in zip(self.tensors, self.views.views(self.model_flat, self.offsets)):
            if tensor.data_ptr() != slot.data_ptr():
                slot.copy_(tensor)
                tensor.data = own_storage(slot)
                moved.append(tensor)
        increment_versions(moved)
        self.storages = (storages(self.tensors), self.storages[1])

    def memory(self) -> list[torch.Tensor]:
        return [t for t in (self.model_flat, self.ema_flat, self.staging) if t is not None]

    def all_finite(self) -> torch.Tensor:
        return torch.isfinite(self.model_flat).all()

    # ---------------------------------------------------------------- updating
    @torch.no_grad()
    def _lerp(self, weight: float) -> None:
        if self.staging is None:
            self._lerp_from(self.model_flat, weight)
        else:  # the average lives elsewhere (the host): one bulk transfer, then lerp there
            self.staging.copy_(self.model_flat)
            self._lerp_from(self.staging, weight)

    def _lerp_from(self, source: torch.Tensor, weight: float) -> None:
        if source.dtype == self.ema_flat.dtype:
            self.ema_flat.lerp_(source, weight)
            return
        step = max(1, CHUNK_BYTES // self.ema_flat.element_size())
        for start in range(0, self.ema_flat.numel(), step):
            self.ema_flat[start : start + step].lerp_(source[start : start + step].to(self.ema_flat.dtype), weight)

    @torch.no_grad()
    def stage(self) -> None:
        """Queue a copy of the model buffer into the pinned staging buffer (an offloaded group; no host wait)."""
        assert self.staging is not None  # offloaded: the average lives elsewhere
        self.staging.copy_(self.model_flat, non_blocking=True)

    @torch.no_grad()
    def lerp_staged(self, weight: float) -> None:
        """On the host, once the staged copy has landed: the average moves towards it (or takes it, if copied)."""
        assert self.staging is not None  # offloaded: the average lives elsewhere
        if self.kind == "copied":
            self.ema_flat.copy_(self.staging)
        else:
            self._lerp_from(self.staging, weight)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        self.ema_flat.copy_(self.model_flat)

    @torch.no_grad()
    def _copy_in(self) -> None:
        self.model_flat.copy_(self.ema_flat)
        increment_versions(self.tensors)

    # ----------------------------------------------------------------- swapping
    @torch.no_grad()
    def swap_in(self) -> None:
        if not self.exchanges_pointers:
            super().swap_in()
            return
        self._exchange_pointers()
        self.marks = versions(self.tensors)
        self.swapped = True

    @torch.no_grad()
    def swap_out(self) -> list[str]:
        if not self.exchanges_pointers:
            return super().swap_out()
        self.note_writes()
        self._exchange_pointers()
        changed = sorted(self.written, key=self.names.index)
        self.marks, self.written, self.swapped = None, set(), False
        return changed

    def note_writes(self) -> None:
        """Remember the tensors written since the version marks were taken (a pointer exchange only)."""
        if self.swapped and self.exchanges_pointers:
            now = versions(self.tensors)
            assert self.marks is not None  # taken at swap-in
            if now != self.marks:
                self.written.update(name for name, v, m in zip(self.names, now, self.marks) if v != m)

    def refresh_marks(self) -> None:
        """Take the version marks anew: a nested swap of another EMA wrote and restored these tensors."""
        if self.swapped and self.exchanges_pointers:
            self.marks = versions(self.tensors)

    def _exchange_pointers(self) -> None:
        """Exchange the storage pointers of the model's tensors and their averages: O(1) per tensor."""
        exchange = torch.UntypedStorage._swap_data_ptr_  # type: ignore[attr-defined]  # torch >= 2.12, not in its stubs
        collections.deque(map(exchange, *self.storages), 0)
        increment_versions(self.tensors)

    def current_averages(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """While the pointers are exchanged, the model's own tensors hold the average."""
        holders = self.tensors if self.swapped and self.exchanges_pointers else self.averages
        yield from zip(self.names, self.tensors, holders)
