"""The base of algorithms: code that changes training, run by the engine before callbacks at each event."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emakit.core.event import Event
    from emakit.core.state import State
    from emakit.loggers import Logger

__all__ = ["Algorithm"]


class Algorithm:
    """Runs :meth:`apply` at every event for which :meth:`match` is true.

    Algorithms may change the training state (weights, batches); their :meth:`state_dict`
    is saved in checkpoints. Example::

        class CountBatches(Algorithm):
            def __init__(self):
                self.batches = 0

            def match(self, event, state):
                return event == Event.BATCH_END

            def apply(self, event, state, logger):
                self.batches += 1
    """

    def match(self, event: Event, state: State) -> bool:
        """Whether to run :meth:`apply` at ``event``."""
        raise NotImplementedError(f"{type(self).__name__} must implement match(event, state)")

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Run the algorithm at ``event``."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(event, state, logger)")

    def training_weights(self, state: State) -> contextlib.AbstractContextManager:
        """A context inside which ``state.model`` holds its training weights.

        Algorithms that swap other weights into the model (an EMA during evaluation) put the
        training weights back for the block, so a checkpoint written then is of the training run.
        """
        return contextlib.nullcontext()

    def evaluation_weights(self, state: State) -> dict[str, contextlib.AbstractContextManager]:
        """Other weights this algorithm can evaluate, by label: each a context that puts them into ``state.model``.

        With ``Trainer(evaluate_all_weights=True)`` every evaluation also runs inside each of these
        (entered with the training weights in the model), reporting metrics as ``NAME/LABEL``.
        An EMA offers its average as ``"ema@<half-life>"``.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this algorithm exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
