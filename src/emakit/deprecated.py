"""Deprecated spellings, kept working for one release with a ``DeprecationWarning`` naming the new one.

- :class:`DeprecatedAlgorithmMethods`: the trainer methods :class:`~emakit.EMA` and :class:`~emakit.PostHocEMA`
  had while each was an :class:`~emakit.Algorithm` itself. They are averages used by hand now, knowing nothing
  of the trainer; ``Trainer(algorithms=[ema])`` runs ``ema.as_algorithm()``, their adapter in
  :mod:`emakit.algorithms`. These methods forward to that adapter: call ``ema.as_algorithm().match(...)`` (and
  so on) instead.
- :class:`RenamedKeyword`: a keyword (and the attribute holding it) renamed, its values translated: the
  ``eval_weights`` of the Trainer, ``EMACallback`` and ``EMATrainer`` (:mod:`emakit.eval_weights`) were
  ``evaluate_all_weights``, ``evaluate_with_ema`` and ``ema_eval``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["DeprecatedAlgorithmMethods", "RenamedKeyword"]


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


class RenamedKeyword:
    """A keyword of ``owner`` renamed from ``old`` to ``new``, with ``values`` translating each old value to a new one.

    :meth:`resolve` takes both spellings of one call; :meth:`attribute` is a property under the old name that
    reads and writes the new attribute. Each use of the old spelling warns (``DeprecationWarning``), naming
    the new spelling. Example::

        >>> renamed = RenamedKeyword("Trainer", "evaluate_all_weights", "eval_weights",
        ...                          {True: "both", False: "ema"}, default="ema", unmatched=False)
        >>> renamed.resolve(None, "training")   # the old keyword not given: the new one as it is
        'training'
        >>> renamed.resolve(True, "ema")        # DeprecationWarning: ... use Trainer(eval_weights='both')
        'both'

    Args:
        owner: the class, as users spell it (``"Trainer"``).
        old, new: the keyword's old and new names, also the attributes' names.
        values: each old value (compared by type and value: ``1`` is not ``True``) and the new value it means.
        default: the new keyword's default: both keywords given are refused unless they mean the same or the
            new one is left at its default.
        unmatched: what the old attribute reads when the new one holds a value no old value meant.
    """

    def __init__(
        self, owner: str, old: str, new: str, values: Mapping[Any, Any], default: Any, unmatched: Any = None
    ) -> None:
        self.owner, self.old, self.new = owner, old, new
        self.values, self.default, self.unmatched = dict(values), default, unmatched

    def _translate(self, value: Any) -> Any:
        for old_value, new_value in self.values.items():
            if type(value) is type(old_value) and value == old_value:
                return new_value
        raise ValueError(
            f"{self.old}={value!r} must be one of {', '.join(map(repr, self.values))} "
            f"({self.old} is deprecated: use {self.new}=...)"
        )

    def _warn(self, owner: str, old: str, new: str, stacklevel: int) -> None:
        warnings.warn(
            f"{owner}{old} is deprecated and will be removed in the next release: use {owner}{new}",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )

    def resolve(self, old_value: Any, new_value: Any, owner: str | None = None, stacklevel: int = 3) -> Any:
        """The new keyword's value: ``new_value``, or, when the old keyword was given (not None), what its value
        means, with a DeprecationWarning. ``owner``: the class's name in the message (a subclass's);
        ``stacklevel``: as ``warnings.warn``'s, counted from ``resolve`` (3: the call of the method calling it)."""
        if old_value is None:
            return new_value
        translated = self._translate(old_value)
        if new_value != self.default and new_value != translated:
            raise ValueError(
                f"{self.old}={old_value!r} (deprecated: {self.new}={translated!r}) and {self.new}={new_value!r} "
                f"disagree: pass {self.new} alone"
            )
        owner = owner or self.owner
        self._warn(owner, f"({self.old}={old_value!r})", f"({self.new}={translated!r})", stacklevel)
        return translated

    def attribute(self) -> property:
        """A property under the old name, reading and writing the new attribute (translated), with a warning."""
        inverse = {new_value: old_value for old_value, new_value in self.values.items()}

        def read(instance: Any) -> Any:
            self._warn(type(instance).__name__, f".{self.old}", f".{self.new}", 2)
            return inverse.get(getattr(instance, self.new), self.unmatched)

        def write(instance: Any, value: Any) -> None:
            self._warn(type(instance).__name__, f".{self.old}", f".{self.new}", 2)
            setattr(instance, self.new, self._translate(value))

        return property(read, write, doc=f"Deprecated: ``{self.new}`` ({self.values}).")
