"""Asynchronous updates: the ordering logic of emakit.side_stream, run on the CPU with a recording stand-in for the
CUDA calls (the CUDA calls themselves run in tests/gpu/). Every average is checked against the float64 closed form.

What is pinned: the side stream starts after the device's current stream; buffers are updated before the side
stream's work, parameters inside it; the next optimizer step waits for every pending update through one
process-wide hook that is never removed while torch iterates its hooks (several averages: the bug that raised
"OrderedDict mutated during iteration"); host work runs only after the device work's event, and every read of the
average waits for it (and re-raises its error); memory is marked for the side stream once per layout.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA
from emakit.shadow import ShadowWeights
from emakit.side_stream import SideStream, pending_side_streams


class Stream:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Event:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.released = threading.Event()
        self.released.set()


class Recording:
    """StreamOps that log every call in order; the work itself runs at once on the CPU."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current = Stream("main")
        self.on_enter: list = []  # callbacks run when a side stream is entered (to look at the state then)
        self.hold_events = False

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def current_stream(self, device: torch.device) -> Stream:
        return self.current

    def new_stream(self, device: torch.device) -> Stream:
        self.log.append(("new_stream", str(device)))
        return Stream(f"side:{device}")

    def wait_stream(self, waiter: Stream, waited: Stream) -> None:
        self.log.append(("wait_stream", waiter.name, waited.name))

    @contextlib.contextmanager
    def use(self, stream: Stream):
        self.log.append(("enter", stream.name))
        for callback in self.on_enter:
            callback()
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous
            self.log.append(("exit", stream.name))

    def record_event(self, stream: Stream) -> Event:
        self.log.append(("record_event", stream.name))
        event = Event(stream)
        if self.hold_events:
            event.released.clear()
        self.last_event = event
        return event

    def wait_event(self, stream: Stream, event: Event) -> None:
        self.log.append(("wait_event", stream.name, event.stream.name))

    def synchronize(self, event: Event) -> None:
        event.released.wait(10)
        self.log.append(("synchronize", event.stream.name))

    def record_stream(self, tensor: torch.Tensor, stream: Stream) -> None:
        self.log.append(("record_stream", stream.name, tensor.data_ptr()))

    def calls(self, name: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == name]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    optimizer.zero_grad()
    model.train()
    model(torch.randn(8, 3, generator=gen)).square().mean().backward()
    optimizer.step()


@pytest.fixture(autouse=True)
def no_pending_left():
    yield
    assert pending_side_streams() == [], "an update was left for the optimizer to wait for"


def test_asynchronous_updates_follow_the_closed_form_and_the_optimizer_waits_for_each():
    ops, model = Recording(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = ShadowWeights(async_update=True, stream_ops=ops)
    reference = ClosedForm(2 ** (-1 / 4))
    shadow.copy_from_model(model)
    reference.update(weights64(model))
    for step in range(5):
        train_step(model, optimizer, step)
        reference.update(weights64(model))
        shadow.update(model, 1 - 2 ** (-1 / 4))
        assert pending_side_streams() == [shadow._side_stream]
        waits_before = len(ops.calls("wait_event"))
        if step < 4:
            train_step(model, optimizer, 100 + step)  # the next optimizer step waits for the update first
            assert len(ops.calls("wait_event")) == waits_before + 1
            assert pending_side_streams() == []
            reference.update(weights64(model))
            shadow.update(model, 1 - 2 ** (-1 / 4))
    state = shadow.state_dict()  # reads wait too
    for name, value in reference.ema.items():
        torch.testing.assert_close(state[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


def test_the_side_stream_starts_after_the_current_stream_and_buffers_are_updated_before_it():
    ops, model = Recording(), make_model()
    shadow = ShadowWeights(async_update=True, stream_ops=ops)
    shadow.copy_from_model(model)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)
    seen = {}

    def look() -> None:  # the average as the side stream begins: buffers already updated, parameters not yet
        seen.update({k: v.clone() for k, v in shadow.state_dict().items()})

    ops.on_enter.append(look)
    before = {k: v.clone() for k, v in shadow.state_dict().items()}
    shadow.update(model, 0.5)
    order = [entry[0] for entry in ops.log if entry[0] in ("wait_stream", "enter", "exit", "record_event")]
    assert order == ["wait_stream", "enter", "exit", "record_event"]
    assert ops.calls("wait_stream")[0][1:] == ("side:cpu", "main")
    assert not torch.equal(seen["1.running_mean"], before["1.running_mean"]), "buffers: updated before the side stream"
    assert torch.equal(seen["0.weight"], before["0.weight"]), "parameters: updated on the side stream"
    shadow.state_dict()


def test_several_averages_pending_at_one_optimizer_step_are_all_waited_for():
    """Each average has its own side stream; the hook used to be removed while torch iterated it."""
    ops, model = Recording(), make_model()
    ema = EMA(half_life=("2ba", "4ba", "8ba"), async_update=True)
    for shadow in ema.shadows:
        shadow._stream_ops = ops
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    references = [ClosedForm(2 ** (-1 / h)) for h in (2, 4, 8)]
    for step in range(4):
        train_step(model, optimizer, step)  # from the second step on: waits for three pending updates
        ema.update(model)
        for reference in references:
            reference.update(weights64(model))
        assert len(pending_side_streams()) == (3 if step else 0)  # the first update is a copy, made at once
    assert len(ops.calls("wait_event")) == 6  # steps 3 and 4 each waited for the three averages
    for index, reference in enumerate(references):
        state = ema.ema_model_at(index).state_dict()
        for name, value in reference.ema.items():
            torch.testing.assert_close(state[name].double(), value, rtol=1e-6, atol=1e-7, msg=f"{index}: {name}")


def test_host_work_runs_after_the_device_event_and_every_read_waits_for_it():
    ops = Recording()
    ops.hold_events = True
    side = SideStream(ops)
    done = []
    side.run(torch.device("cpu"), lambda: None, lambda: done.append(time.monotonic()))
    time.sleep(0.05)
    assert done == [], "host work ran before its device work's event completed"
    released = time.monotonic()
    threading.Timer(0.1, ops.last_event.released.set).start()
    side.finish()  # blocks until the host work is done
    assert done and done[0] >= released
    assert ops.log[-1] == ("synchronize", "side:cpu")


def test_an_error_in_host_work_is_raised_by_the_next_read():
    side = SideStream(Recording())

    def broken() -> None:
        raise MemoryError("host lerp failed")

    side.run(torch.device("cpu"), lambda: None, broken)
    with pytest.raises(MemoryError, match="host lerp failed"):
        side.finish()
    side.finish()  # reported once


def test_memory_is_marked_for_the_side_stream_once_per_layout():
    ops, model = Recording(), make_model()
    shadow = ShadowWeights(async_update=True, stream_ops=ops)
    shadow.copy_from_model(model)
    shadow.update(model, 0.5)
    first = len(ops.calls("record_stream"))
    tracked = len(model.state_dict())  # every tracked tensor and each group's average buffer
    assert first >= tracked
    shadow.update(model, 0.5)
    assert len(ops.calls("record_stream")) == first  # the same memory: not marked again
    model.to(torch.float64)  # new memory for every tensor (the average carries on, laid out again)
    shadow.update(model, 0.5)
    marked = {entry[2] for entry in ops.calls("record_stream")[first:]}
    assert {t.data_ptr() for t in model.state_dict().values()} <= marked
    shadow.state_dict()


def test_without_a_supported_device_async_update_warns_and_updates_synchronously():
    model = make_model()
    shadow = ShadowWeights(async_update=True)  # CUDA's calls: the CPU is not theirs
    shadow.copy_from_model(model)
    with pytest.warns(UserWarning, match="async_update=True needs a model on one CUDA device"):
        shadow.update(model, 0.5)
    assert shadow.async_update is False and pending_side_streams() == []


def test_ema_wait_orders_the_current_stream_after_a_pending_update():
    """Before writing the weights outside optimizer.step() (a clamp): ema.wait(), no host wait."""
    ops, model = Recording(), make_model()
    ema = EMA(smoothing=0.5, async_update=True)
    ema.shadow._stream_ops = ops
    ema.update(model)
    ema.update(model)  # queued on the side stream
    assert pending_side_streams() == [ema.shadow._side_stream]
    ema.wait()
    assert pending_side_streams() == [] and ops.calls("wait_event")[-1][1:] == ("main", "side:cpu")
    ema.wait()  # nothing pending: nothing to wait for
    assert len(ops.calls("wait_event")) == 1
