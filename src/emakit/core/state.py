"""Everything a training run knows at one moment: model, optimizers, clock, batch, metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from emakit.time import Time, Timestamp, TimeUnit

__all__ = ["State"]


@dataclasses.dataclass
class State:
    """The trainer's state, shared with algorithms and callbacks.

    ``timestamp`` counts completed work; ``max_duration`` is when training stops;
    ``eval_history`` holds one dict per evaluation: the clock and the metrics. ``parallelism``
    says, already at INIT (before the model is wrapped), whether the run shards the model.
    """

    model: nn.Module
    max_duration: Time
    optimizers: list[torch.optim.Optimizer] = dataclasses.field(default_factory=list)
    schedulers: list[Any] = dataclasses.field(default_factory=list)
    timestamp: Timestamp = dataclasses.field(default_factory=Timestamp)
    batches_per_epoch: int | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    parallelism: str | None = None  # what the trainer wraps the model in: "ddp", "fsdp" or None (as it is)
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def elapsed_fraction(self) -> float:
        """How much of ``max_duration`` is done, in [0, 1]; in batches when ``max_duration`` is in epochs."""
        unit, total = self.max_duration.unit, self.max_duration.value
        if unit is TimeUnit.EPOCH and self.batches_per_epoch:
            done, total = self.timestamp.batch, total * self.batches_per_epoch
        else:
            done = self.timestamp.get(unit)
        return 1.0 if total == 0 else min(1.0, done / total)

    def reached(self, time: Time) -> bool:
        """Whether the run has reached ``time`` (in any unit, ``dur`` included)."""
        if time.unit is TimeUnit.DURATION:
            return self.elapsed_fraction() >= time.value
        return self.timestamp.get(time.unit) >= time.value

    def in_batches(self, time: Time) -> int | float | None:
        """``time`` as a number of batches, where the run's shape tells (None where it doesn't)."""
        if time.unit is TimeUnit.BATCH:
            return time.value
        if time.unit is TimeUnit.EPOCH and self.batches_per_epoch:
            return time.value * self.batches_per_epoch
        if time.unit is TimeUnit.DURATION:
            total = self.in_batches(self.max_duration)
            return None if total is None else time.value * total
        return None

    def is_done(self) -> bool:
        return self.reached(self.max_duration)
