"""Asynchronous EMA updates: the ordering that keeps them exact, apart from the CUDA calls that carry it out.

An update only reads the parameters, so it may run on a side stream while the next batch's forward
pass runs on the main stream. What keeps it exact, in order:

1. The side stream waits for everything already queued on the device's current stream (the
   optimizer step that produced the weights) before the update's kernels.
2. Buffers (BatchNorm statistics) are not part of it: the next forward pass and DDP's broadcast
   write them, so the caller updates them synchronously, before queuing the rest.
3. Nothing may write the parameters until the update has read them: the next ``optimizer.step()``
   waits for it (a global optimizer step pre-hook makes the device's current stream wait for the
   update's event; the host does not block), and so does every operation of the EMA (swap, copy,
   state read, the next update).
4. Memory the update reads or writes outlives it: every device tensor of a layout is marked as in
   use by the side stream (``record_stream``), so freeing it (``model.to()``, ``del ema``) while the
   update runs cannot hand the memory to another tensor before the update is done.
5. An average offloaded to the host is updated in two halves: the side stream copies the weights
   into pinned host memory (no host wait), and a worker thread lerps on the host once that copy has
   landed. The optimizer waits for the copy only; the EMA's own operations wait for the lerp too.

The hook is process-wide (the EMA does not know the user's optimizers): registered once, at the
first asynchronous update, through ``torch.optim.optimizer.register_optimizer_step_pre_hook``, and
kept — it is never removed while torch iterates the hooks, and returns at once when no update is
pending. It assumes one thread steps optimizers and updates EMAs, as in every training loop.

The CUDA calls sit behind :class:`StreamOps` (:data:`CUDA` carries them out), so the ordering above
is tested on machines without a GPU with a recording stand-in, and on a GPU by ``tests/gpu``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

__all__ = ["CUDA", "CudaStreamOps", "SideStream", "StreamOps", "pending_side_streams"]


class StreamOps(Protocol):
    """The stream and event calls the ordering needs; :class:`CudaStreamOps` is CUDA's."""

    def supports(self, device: torch.device) -> bool: ...
    def current_stream(self, device: torch.device) -> Any: ...
    def new_stream(self, device: torch.device) -> Any: ...
    def wait_stream(self, waiter: Any, waited: Any) -> None: ...
    def use(self, stream: Any) -> contextlib.AbstractContextManager: ...
    def record_event(self, stream: Any) -> Any: ...
    def wait_event(self, stream: Any, event: Any) -> None: ...
    def synchronize(self, event: Any) -> None: ...
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...


class CudaStreamOps:
    """:class:`StreamOps` carried out by ``torch.cuda``."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    def wait_stream(self, waiter: torch.cuda.Stream, waited: torch.cuda.Stream) -> None:
        waiter.wait_stream(waited)

    def use(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def record_event(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        return stream.record_event()

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)


CUDA = CudaStreamOps()

_pending: weakref.WeakSet[SideStream] = weakref.WeakSet()  # side streams with updates the optimizer must wait for
_hook: torch.utils.hooks.RemovableHandle | None = None


def pending_side_streams() -> list[SideStream]:
    """The side streams whose queued updates the next optimizer step will wait for."""
    return list(_pending)


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for side_stream in list(_pending):  # a copy: wait() leaves the set
        side_stream.wait()


def _install_hook() -> None:
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook = register_optimizer_step_pre_hook(_before_optimizer_step)


class SideStream:
    """Runs EMA updates on a side stream per device and orders everything after them.

    Example::

        side = SideStream()
        side.run(device, lambda: torch._foreach_lerp_(averages, weights, 0.01))   # returns at once
        optimizer.step()                   # the device's stream first waits for the update
        side.finish()                      # before reading the average
    """

    def __init__(self, ops: StreamOps = CUDA) -> None:
        self.ops = ops
        self._streams: dict[torch.device, Any] = {}
        self._events: list[tuple[torch.device, Any]] = []  # queued device work the current streams must wait for
        self._host_work: concurrent.futures.Future | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    def stream(self, device: torch.device) -> Any:
        """The side stream of ``device`` (made at first use)."""
        if device not in self._streams:
            self._streams[device] = self.ops.new_stream(device)
        return self._streams[device]

    def keep_alive(self, device: torch.device, tensors: Iterable[torch.Tensor]) -> None:
        """Mark ``tensors`` (on ``device``) as used by its side stream: their memory is not reused before the
        side stream's work queued at the time they are freed is done. Once per tensor memory is enough."""
        stream = self.stream(device)
        for tensor in tensors:
            if tensor.device.type == device.type:
                self.ops.record_stream(tensor, stream)

    def run(
        self,
        device: torch.device,
        device_work: Callable[[], None],
        host_work: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``device_work`` on ``device``'s side stream after everything on its current stream; then, if
        given, ``host_work`` on a worker thread once the device work is done. Returns without waiting."""
        self.finish()  # one update at a time: the previous one has been read by now
        stream = self.stream(device)
        self.ops.wait_stream(stream, self.ops.current_stream(device))
        with self.ops.use(stream):
            device_work()
        event = self.ops.record_event(stream)
        self._events.append((device, event))
        _pending.add(self)
        _install_hook()
        if host_work is not None:
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emakit-ema")
            self._host_work = self._worker.submit(self._after, event, host_work)

    def _after(self, event: Any, work: Callable[[], None]) -> None:
        self.ops.synchronize(event)
        work()

    def wait(self) -> None:
        """Make the devices' current streams wait for the queued device work (the host does not block)."""
        for device, event in self._events:
            self.ops.wait_event(self.ops.current_stream(device), event)
        self._events.clear()
        _pending.discard(self)

    def finish(self) -> None:
        """:meth:`wait`, and block until host work is done (re-raising its error): the average is then final."""
        self.wait()
        if self._host_work is not None:
            work, self._host_work = self._host_work, None
            work.result()

    def __del__(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
