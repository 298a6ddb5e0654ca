"""Asynchronous updates of :class:`~emakit.shadow.ShadowWeights` (``async_update=True``, one CUDA device).

Buffers are updated now, on the current stream (the next forward and DDP's broadcast write them); parameters on
a side stream that first waits for the current one (the optimizer step); the host half of an offloaded average
(a lerp in pinned memory) on a worker thread once its copy has landed. The ordering lives in
:mod:`emakit.side_stream`; every read of the average waits for a pending update first (:meth:`_settle`).
"""

from __future__ import annotations

import warnings

import torch

from emakit.side_stream import SideStream, StreamOps
from emakit.storage import Group

__all__ = ["AsynchronousUpdates"]


class AsynchronousUpdates:
    """:class:`~emakit.shadow.ShadowWeights`' updates on a side stream, and the waits that order what comes next."""

    _groups: list[Group]
    _stream_ops: StreamOps
    _side_stream: SideStream | None
    _generation: int
    _streamed: int
    async_update: bool

    def _settle(self) -> None:
        """Order what comes next after any update still running asynchronously, and wait for its host half."""
        if self._side_stream is not None:
            self._side_stream.finish()

    def wait(self) -> None:
        """Make the device's current stream wait for a pending asynchronous update (the host does not block).

        Call it before writing the model's parameters outside ``optimizer.step()`` (which waits by
        itself), e.g. a weight clamp right after ``ema.update(model)``.
        """
        if self._side_stream is not None:
            self._side_stream.wait()

    def _asynchronous_device(self) -> torch.device | None:
        """The one CUDA device of the model, where updates may run on a side stream; else None, with a warning."""
        devices = {group.device for group in self._groups}
        device = next(iter(devices))
        if len(devices) == 1 and self._stream_ops.supports(device):
            return device
        warnings.warn(
            f"async_update=True needs a model on one CUDA device, not {sorted(map(str, devices))}: "
            "updating synchronously",
            stacklevel=4,
        )
        self.async_update = False
        return None

    def _update_asynchronously(self, weight: float) -> None:
        """Buffers now, on the current stream (the next forward writes them); parameters on the side stream; the
        host half of an offloaded average on a worker thread. See :mod:`emakit.side_stream`."""
        device = self._groups[0].device
        if self._side_stream is None:
            self._side_stream = SideStream(self._stream_ops)
        if self._streamed != self._generation:  # new tensor memory: used by the side stream too
            self._side_stream.keep_alive(device, [t for group in self._groups for t in group.memory()])
            self._streamed = self._generation
        for group in self._groups:
            if group.kind != "parameters":
                group.update(weight)
        on_device = [g for g in self._groups if g.kind == "parameters" and not g.pinned]
        on_host = [g for g in self._groups if g.kind == "parameters" and g.pinned]

        def device_work() -> None:
            for group in on_device:
                group.update(weight)
            for group in on_host:
                group.stage()

        def host_work() -> None:
            for group in on_host:
                group.lerp_staged(weight)

        self._side_stream.run(device, device_work, host_work if on_host else None)
