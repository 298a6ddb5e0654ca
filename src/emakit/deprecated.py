"""Deprecated: the trainer methods :class:`~emakit.EMA` and :class:`~emakit.PostHocEMA` had while each was an
:class:`~emakit.Algorithm` itself.

They are averages used by hand now, knowing nothing of the trainer; ``Trainer(algorithms=[ema])`` runs
``ema.as_algorithm()``, their adapter in :mod:`emakit.algorithms`. These methods forward to that adapter
with a ``DeprecationWarning``: call ``ema.as_algorithm().match(...)`` (and so on) instead.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

__all__ = ["DeprecatedAlgorithmMethods"]


def _warn(owner: object, name: str) -> None:
    kind = type(owner).__name__
    warnings.warn(
        f"{kind}.{name}(...) is deprecated: {kind} is no longer an emakit.Algorithm; call "
        f"{kind.lower()}.as_algorithm().{name}(...), the adapter Trainer(algorithms=[...]) runs",
        DeprecationWarning,
        stacklevel=3,
    )


class DeprecatedAlgorithmMethods:
    """``match``, ``apply``, ``training_weights`` and ``evaluation_weights`` of an :class:`~emakit.Algorithm`,
    forwarded to ``self.as_algorithm()`` with a DeprecationWarning."""

    def as_algorithm(self) -> Any:
        raise NotImplementedError

    def match(self, event: Any, state: Any) -> bool:
        _warn(self, "match")
        return self.as_algorithm().match(event, state)

    def apply(self, event: Any, state: Any, logger: Any) -> None:
        _warn(self, "apply")
        self.as_algorithm().apply(event, state, logger)

    def training_weights(self, state: Any) -> contextlib.AbstractContextManager:
        _warn(self, "training_weights")
        return self.as_algorithm().training_weights(state)

    def evaluation_weights(self, state: Any) -> dict[str, contextlib.AbstractContextManager]:
        _warn(self, "evaluation_weights")
        return self.as_algorithm().evaluation_weights(state)
