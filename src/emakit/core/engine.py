"""The engine: at each event, run the matching algorithms, then every callback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from emakit.core.algorithm import Algorithm, as_algorithm
from emakit.core.callback import Callback
from emakit.core.event import Event
from emakit.core.state import State
from emakit.loggers import Logger

__all__ = ["Engine"]


class Engine:
    """Runs algorithms (when they match) and then callbacks at each event.

    Algorithms run in the order given, and in reverse at closing events (``EVAL_END``,
    ``FIT_END``, ...: :attr:`Event.is_closing`), as Composer's engine does: swaps nest.
    ``algorithms`` may hold objects with an ``as_algorithm()`` method (an :class:`~emakit.EMA`):
    :attr:`algorithms` holds what it returns (:func:`~emakit.core.algorithm.as_algorithm`).
    """

    def __init__(
        self, state: State, algorithms: Sequence[Algorithm | Any], callbacks: Sequence[Callback], logger: Logger
    ) -> None:
        self.check(algorithms, callbacks)
        self.state = state
        self.algorithms = [as_algorithm(algorithm) for algorithm in algorithms]
        self.callbacks = list(callbacks)
        self.logger = logger

    @staticmethod
    def check(algorithms: Sequence[Algorithm | Any], callbacks: Sequence[Callback]) -> None:
        """Raise ValueError naming the first entry that is not an Algorithm (nor has ``as_algorithm()``) or Callback."""
        for algorithm in algorithms:
            as_algorithm(algorithm)  # NotAnAlgorithmError: a ValueError
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise ValueError(f"callbacks must be emakit.Callback instances, got {callback!r}")

    def run_event(self, event: Event) -> None:
        for algorithm in reversed(self.algorithms) if event.is_closing else self.algorithms:
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state, self.logger)
        for callback in self.callbacks:
            callback.run_event(event, self.state, self.logger)
