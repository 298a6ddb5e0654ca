"""The base of callbacks: code that observes training (logging, checkpoints), run after algorithms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emakit.core.event import Event

if TYPE_CHECKING:
    from emakit.core.state import State
    from emakit.loggers import Logger

__all__ = ["Callback"]


class Callback:
    """Override the methods named after the events you need; the others do nothing.

    Example::

        class PrintEval(Callback):
            def eval_end(self, state, logger):
                print(state.timestamp.epoch, state.eval_metrics)
    """

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Call the method named after ``event``."""
        getattr(self, event.value)(state, logger)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this callback exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _do_nothing(self: Callback, state: State, logger: Logger) -> None:
    """Runs at this event; does nothing unless overridden."""


for _event in Event:
    setattr(Callback, _event.value, _do_nothing)
