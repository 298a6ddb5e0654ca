"""A cast or offloaded average: another dtype than the tensors' (fp32 of bf16 weights) or another device (the CPU).

An update goes a chunk of tensors at a time: the chunk is copied (cast, moved) into a temporary
of the average's dtype and device, at most 16 MiB, and lerped there in one flat kernel::

    temporary <- model tensors i..j          (cast / moved)
    average[i..j] += w * (temporary - average[i..j])

An average offloaded to pinned host memory can also be updated in two halves, for asynchronous
updates: :meth:`CastGroup.stage` queues the copy of the whole group into a pinned staging buffer
(no host wait), and :meth:`CastGroup.lerp_staged` lerps on the host once that copy has landed.
"""

from __future__ import annotations

import torch

from emakit.storage.group import Group
from emakit.storage.layout import CHUNK_BYTES

__all__ = ["CastGroup"]


class CastGroup(Group):
    """Tensors whose average has another dtype or device: updated through a chunk-sized temporary."""

    _temporary: tuple[torch.Tensor, list[list[torch.Tensor]]] | None = None
    _staging: torch.Tensor | None = None

    def _span(self, i: int, j: int) -> tuple[int, int]:
        """The slice of ``ema_flat`` that tensors ``i..j`` occupy (their padding included)."""
        return self.offsets[i], self._span_end(j)

    def _temporaries(self) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """A buffer of the average's dtype and device for the largest chunk, with views for every chunk.

        Pinned host buffers are slow to allocate: an offloaded group keeps its one.
        """
        if self._temporary is not None:
            return self._temporary
        spans = [self._span(i, j) for i, j in self.chunks]
        flat = torch.zeros(
            max(stop - start for start, stop in spans),
            dtype=self.ema_flat.dtype,
            device=self.ema_flat.device,
            pin_memory=self.pinned,
        )
        views = [
            [
                flat.as_strided(a.shape, a.stride(), offset - start)
                for a, offset in zip(self.averages[i:j], self.offsets[i:j])
            ]
            for (i, j), (start, _) in zip(self.chunks, spans)
        ]
        if self.pinned:
            self._temporary = (flat, views)
        return flat, views

    @torch.no_grad()
    def _lerp(self, weight: float) -> None:
        data = self.sources
        flat, views = self._temporaries()
        for (i, j), chunk_views in zip(self.chunks, views):
            torch._foreach_copy_(chunk_views, data[i:j])
            start, stop = self._span(i, j)
            self.ema_flat[start:stop].lerp_(flat[: stop - start], weight)

    # ------------------------------------------------------- asynchronous halves
    @torch.no_grad()
    def stage(self) -> None:
        """Queue a copy of the model's tensors into pinned host memory (an offloaded group; no host wait)."""
        if self._staging is None:
            self._staging = torch.zeros(self.ema_flat.numel(), dtype=self.source_dtype, pin_memory=True)
        views = self.views.views(self._staging, self.offsets)
        torch._foreach_copy_(views, self.sources, non_blocking=True)

    @torch.no_grad()
    def lerp_staged(self, weight: float) -> None:
        """On the host, once the staged copy has landed: the average moves towards it (or takes it, if copied)."""
        staging = self._staging
        assert staging is not None  # stage() came first
        if self.kind == "copied":
            self.ema_flat.copy_(staging)
            return
        step = max(1, CHUNK_BYTES // self.ema_flat.element_size())
        for start in range(0, self.ema_flat.numel(), step):
            chunk = staging[start : start + step]
            self.ema_flat[start : start + step].lerp_(chunk.to(self.ema_flat.dtype), weight)
