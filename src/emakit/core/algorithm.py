"""The base of algorithms: code that changes training, run by the engine before callbacks at each event.

:func:`as_algorithm` is how the trainer takes its ``algorithms``: an :class:`Algorithm` as it is, or any
object with an ``as_algorithm()`` method (an :class:`~emakit.EMA`, a :class:`~emakit.PostHocEMA`: averages
used by hand, which know nothing of the trainer) as the adapter that method returns.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emakit.core.event import Event
    from emakit.core.state import State
    from emakit.loggers import Logger

__all__ = ["Algorithm", "NotAnAlgorithmError", "ProvidesAlgorithm", "as_algorithm"]


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

    @property
    def state_is_per_rank(self) -> bool:
        """Whether :meth:`state_dict` differs per rank (each rank keeps a slice of something): a checkpoint written
        by one rank then holds every rank's (:func:`emakit.distributed.gather_states`). False by default."""
        return False

    def training_weights(self, state: State) -> contextlib.AbstractContextManager:
        """A context inside which ``state.model`` holds its training weights.

        Algorithms that swap other weights into the model (an EMA during evaluation) put the
        training weights back for the block, so a checkpoint written then is of the training run.
        """
        return contextlib.nullcontext()

    def evaluation_weights(self, state: State) -> dict[str, contextlib.AbstractContextManager]:
        """Other weights this algorithm can evaluate, by label: each a context that puts them into ``state.model``.

        With ``Trainer(eval_weights="both")`` every evaluation also runs inside each of these
        (entered with the training weights in the model), reporting metrics as ``NAME/LABEL``.
        An EMA offers its average as ``"ema@<half-life>"``.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this algorithm exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ProvidesAlgorithm(Protocol):
    """What the trainer takes among its ``algorithms`` besides an :class:`Algorithm`: an object whose
    ``as_algorithm()`` gives one (an :class:`~emakit.EMA`, a :class:`~emakit.PostHocEMA`)."""

    def as_algorithm(self) -> Algorithm: ...


class NotAnAlgorithmError(TypeError, ValueError):
    """An entry of ``algorithms`` that is neither an :class:`Algorithm` nor has an ``as_algorithm()`` giving one.

    A TypeError (a wrong kind of object), and a ValueError as the Trainer raised before the protocol.
    """


def as_algorithm(entry: Any) -> Algorithm:
    """``entry`` as an :class:`Algorithm`: itself when it is one, else what its ``as_algorithm()`` returns.

    The protocol lets code that knows nothing of the trainer run in it: an :class:`~emakit.EMA` is used
    by hand, and ``ema.as_algorithm()`` gives its trainer adapter (one per EMA, the same at every call).
    The Trainer and the :class:`~emakit.core.Engine` call this for every entry of ``algorithms``.
    Raises :class:`NotAnAlgorithmError` naming the entry otherwise. Example::

        >>> ema = EMA(half_life="50ba")
        >>> as_algorithm(ema) is ema.as_algorithm()
        True
        >>> as_algorithm("EMA")
        Traceback (most recent call last):
        NotAnAlgorithmError: algorithms must be emakit.Algorithm instances or objects with ...
    """
    if isinstance(entry, Algorithm):
        return entry
    convert = None if isinstance(entry, type) else getattr(entry, "as_algorithm", None)
    if not callable(convert):
        raise NotAnAlgorithmError(
            "algorithms must be emakit.Algorithm instances or objects with an as_algorithm() method "
            f"(emakit.EMA, emakit.PostHocEMA), got {entry!r}"
        )
    algorithm = convert()
    if not isinstance(algorithm, Algorithm):
        raise NotAnAlgorithmError(
            f"algorithms must be emakit.Algorithm instances or objects whose as_algorithm() returns one: {entry!r}"
            f".as_algorithm() returned {algorithm!r}"
        )
    return algorithm
