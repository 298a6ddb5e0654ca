"""Swaps: the average put into the model and its training weights given back, bit for bit; swaps nest.

Per model a stack records the averages swapped into it, innermost last. A swap-out must be the innermost
(else RuntimeError, nothing changed), and no average updates a model that holds swapped-in weights.
Swapping in parks the model's values and copies the average in; swapping out checks every parameter
byte for byte against the average (:mod:`emakit.storage.write_check`) and puts the training weights back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from emakit.storage import Group
from emakit.tracked import unwrap

if TYPE_CHECKING:
    from emakit.shadow.weights import ShadowWeights

__all__ = ["Swaps", "has_swaps", "swapped_into"]

# Per model, the averages swapped into it, innermost last: swaps must nest.
_swaps: weakref.WeakKeyDictionary[nn.Module, list[ShadowWeights]] = weakref.WeakKeyDictionary()


def swapped_into(model: nn.Module) -> list[ShadowWeights]:
    """The averages swapped into ``model`` now, innermost last."""
    return list(_swaps.get(unwrap(model), []))


def has_swaps(model: nn.Module) -> bool:
    """Whether any average is swapped into ``model`` now."""
    return bool(_swaps.get(unwrap(model)))


class Swaps:
    """:class:`~emakit.shadow.ShadowWeights`' swaps in and out of the model."""

    _groups: list[Group]
    _snapshot: nn.Module | None

    _settle: Callable[[], None]  # AsynchronousUpdates
    attach: Callable[[nn.Module], nn.Module]  # ShadowLayout
    attached_model: Callable[[], nn.Module | None]  # ShadowLayout

    @property
    def swapped(self) -> bool:
        """Whether the average is in the model right now (between ``swap_in`` and ``swap_out``)."""
        return any(group.swapped for group in self._groups)

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        """Put the average into the model; its own values go where the average was (parameters) or aside (buffers).

        Swaps nest: another EMA may swap in on top of this one, and must swap out first.
        """
        self._settle()
        if self.swapped:
            raise RuntimeError("the EMA weights are already swapped in")
        self.attach(model)
        model = unwrap(model)
        for group in self._groups:  # every group before any writes: a refused swap changes nothing
            group.check_writable()
        outer = _swaps.setdefault(model, [])
        if outer:  # the innermost swap so far notes what was written under it: from here on writes are this one's
            for group in outer[-1]._groups:
                group.note_writes()
        for group in self._groups:
            group.swap_in()
        outer.append(cast("ShadowWeights", self))  # Swaps is a part of ShadowWeights only

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> None:
        """Give the model back its training weights, bit for bit.

        Raises RuntimeError, after restoring them, when a parameter was written in place during the swap
        (an optimizer step inside ``ema_weights``, ``.data``, numpy). By default such a write was made to
        the model's copy of the average and is discarded: the average is unchanged. Under a pointer
        exchange (``flatten_model=True``, same dtype and device) it went into the average itself.
        """
        if not self.swapped:
            raise RuntimeError("the EMA weights are not swapped in")
        model = unwrap(model)
        if self.attached_model() is not model:
            raise RuntimeError("swap_out got another model than swap_in")
        stack = _swaps.get(model, [])
        if stack[-1:] != [self]:
            raise RuntimeError(
                "swap-outs must come in the reverse order of swap-ins: another EMA's weights were swapped into "
                "this model after this one's and are still in; swap that one out first"
            )
        for group in self._groups:  # every group before any writes: a refused swap-out leaves the swap in place
            group.check_writable()
        stack.pop()
        written = {group: group.swap_out() for group in self._groups}
        if stack:  # the swap under this one is innermost again; what this one wrote there it also undid
            for group in stack[-1]._groups:
                group.refresh_marks()
        discarded = [name for group, names in written.items() if not group.writes_reach_average for name in names]
        reached = [name for group, names in written.items() if group.writes_reach_average for name in names]
        if reached:
            self._snapshot = None
            raise RuntimeError(
                f"{len(reached)} parameter(s) were written in place while the EMA weights were swapped in "
                f"({', '.join(reached[:5])}): the model has its training weights back, but with flatten_model=True "
                "the swap exchanged memory and those writes went into the average; evaluate inside "
                "ema_weights(...) and train outside it, or reset the average with copy_from_model"
            )
        if discarded:
            raise RuntimeError(
                f"{len(discarded)} parameter(s) were written in place while the EMA weights were swapped in "
                f"({', '.join(discarded[:5])}): those writes were made to the model's copy of the average and are "
                "discarded; the model has its training weights back and the average is unchanged. Evaluate "
                "inside ema_weights(...) and train outside it"
            )

    @torch.no_grad()
    def keep_buffers_from_model(self) -> None:
        """While swapped in: make the model's buffers (measured on the average, e.g. by update_bn) the average's."""
        if not self.swapped:
            raise RuntimeError("keep_buffers_from_model needs the EMA weights swapped in")
        self._snapshot = None
        for group in self._groups:
            group.keep_model_buffers()
