"""EMA updates on a CUDA side stream, overlapping the next forward pass.

An update only reads the parameters, so it may run while the next batch's forward pass
runs too. Two orderings keep it exact: the side stream starts after the main stream has
finished the optimizer step (it waits on the main stream), and nothing may change the
parameters or read the average before the update is done: the next optimizer step waits
for it through an optimizer step pre-hook, and the engine waits before every swap, copy,
load or state read.

torch offers step pre-hooks per optimizer or for all optimizers; the EMA does not know the
user's optimizers, so the hook is the process-wide one — registered only while an update is
pending and removed by the first wait, so it costs nothing otherwise. It assumes one thread
steps optimizers and updates EMAs, as in every training loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SideStream"]


class SideStream:
    """Runs work on one CUDA device's side stream and makes later readers wait for it."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[torch.cuda.Event] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def run(self, device: torch.device, work: Callable[[], None]) -> None:
        """Run ``work`` on ``device``'s side stream after everything already queued on its current stream."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            work()
        self._pending.append(stream.record_event())
        if self._hook is None:
            self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(lambda *_: self.wait())

    def wait(self) -> None:
        """Make the current streams wait for the work run so far (the host does not block)."""
        for event in self._pending:
            torch.cuda.current_stream().wait_event(event)
        self._pending.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
