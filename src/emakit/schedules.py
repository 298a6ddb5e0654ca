"""Smoothing schedules for ``EMA(schedule=...)``: the smoothing as a function of the optimizer step.

``EMA(schedule=f)`` uses ``f(step)`` as the smoothing of the update at optimizer step ``step`` (counted from 1 at the
first optimizer step of the run; the first update copies the weights, as always). Any callable ``int -> float`` in
[0, 1] works; a value outside is refused, naming the step. These are the ones peers use:

:func:`cosine`
    DINO's teacher momentum, rising from ``start`` to ``end`` over ``steps`` optimizer steps::

        smoothing(t) = end - (end - start) * (1 + cos(pi * min(t, steps) / steps)) / 2

:func:`growing_half_life`
    torchtitan's default: a half-life that grows with the run, ``fraction`` of the steps done::

        smoothing(t) = 2 ** (-1 / (fraction * t))        (fraction=0.05: torchtitan's 2 ** (-1 / (0.05 t)))

A schedule with a ``set_run_length(steps)`` method hears the run's length from ``EMA.set_run_length`` (emakit's
Trainer and the integrations call it at the start of training): ``cosine()`` without ``steps`` spans the run.

Example::

    >>> from emakit import EMA, schedules
    >>> ema = EMA(schedule=schedules.cosine(start=0.996, end=1.0, steps=1000))
    >>> schedules.cosine(0.996, 1.0, steps=1000)(500)
    0.998
"""

from __future__ import annotations

import math

__all__ = ["Cosine", "GrowingHalfLife", "cosine", "growing_half_life"]


class Cosine:
    """:func:`cosine`'s schedule."""

    def __init__(self, start: float, end: float, steps: int | None) -> None:
        for name, value in (("start", start), ("end", end)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"cosine: {name}={value!r} must be a smoothing in [0, 1]")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"cosine: steps={steps!r} must be an int >= 1, or None to span the run")
        self.start, self.end, self.steps = float(start), float(end), steps
        self.spans_run = steps is None  # then set_run_length gives the steps
        self.label = f"cosine({self.start:g}->{self.end:g})"

    def set_run_length(self, steps: float) -> None:
        """Span ``steps`` optimizer steps, unless ``steps`` was given."""
        if self.spans_run:
            self.steps = max(1, int(steps))

    def __call__(self, step: int) -> float:
        if self.steps is None:
            raise RuntimeError(
                f"{self.label}: the run's length is unknown: give cosine(..., steps=N), or call "
                "ema.set_run_length(total_optimizer_steps) (a Trainer and the integrations do)"
            )
        progress = min(step, self.steps) / self.steps
        return self.end - (self.end - self.start) * (1 + math.cos(math.pi * progress)) / 2

    def __repr__(self) -> str:
        return f"cosine(start={self.start!r}, end={self.end!r}, steps={self.steps!r})"


class GrowingHalfLife:
    """:func:`growing_half_life`'s schedule."""

    def __init__(self, fraction: float) -> None:
        if not (isinstance(fraction, (int, float)) and fraction > 0):
            raise ValueError(f"growing_half_life: fraction={fraction!r} must be > 0 (torchtitan: 0.05)")
        self.fraction = float(fraction)
        self.label = f"half_life={self.fraction:g}t"

    def __call__(self, step: int) -> float:
        return 2.0 ** (-1.0 / (self.fraction * step))

    def __repr__(self) -> str:
        return f"growing_half_life(fraction={self.fraction!r})"


def cosine(start: float = 0.996, end: float = 1.0, steps: int | None = None) -> Cosine:
    """DINO's cosine momentum: ``end - (end - start) * (1 + cos(pi * min(t, steps) / steps)) / 2`` at step ``t``.

    ``steps``: how many optimizer steps the rise takes; None spans the run (``EMA.set_run_length``).
    """
    return Cosine(start, end, steps)


def growing_half_life(fraction: float = 0.05) -> GrowingHalfLife:
    """torchtitan's ``2 ** (-1 / (fraction * t))``: a half-life of ``fraction`` of the steps done at step ``t``."""
    return GrowingHalfLife(fraction)
