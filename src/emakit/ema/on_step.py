"""An EMA that follows every ``optimizer.step()`` by itself: no ``ema.update(model)`` to forget.

``ema.update_on_step(optimizer, model)`` registers a step post hook on the optimizer (``register_step_post_hook``):
after each ``optimizer.step()`` that ran, ``ema.update(model)`` runs. With several optimizers stepping one model (a
GAN's, or one per parameter group), an update runs once all of them have stepped since the last one: one training
step is one update, as the Lightning and Hugging Face integrations count them. A step a ``GradScaler`` skips (inf or
NaN gradients) never calls ``optimizer.step()``, so it is not counted either.

The hooks stay until :meth:`StepHooks.remove` (or the end of a ``with`` block). While they are there, a call of
``ema.update`` from elsewhere (a Trainer, an integration, a loop) raises: the steps would be counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from emakit.ema.ema import EMA

__all__ = ["EMAOnStep", "StepHooks"]


class StepHooks:
    """The hooks :meth:`EMAOnStep.update_on_step` registered: ``remove()`` them, or use them as a context manager."""

    def __init__(self, ema: EMA, optimizers: Sequence[torch.optim.Optimizer], model: nn.Module) -> None:
        self.ema, self.model = ema, model
        self.optimizers = list(optimizers)
        self._stepped: set[int] = set()
        self._handles = [optimizer.register_step_post_hook(self._after_step) for optimizer in self.optimizers]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped.add(id(optimizer))
        if len(self._stepped) < len(self.optimizers):
            return  # another optimizer of this training step has yet to step
        self._stepped.clear()
        self.ema._updating_on_step = True
        try:
            self.ema.update(self.model)
        finally:
            self.ema._updating_on_step = False

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks: ``optimizer.step()`` no longer updates the EMA (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.ema._step_hooks is self:
            self.ema._step_hooks = None

    def __enter__(self) -> StepHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class EMAOnStep:
    """:class:`~emakit.EMA`'s :meth:`update_on_step`."""

    _step_hooks: StepHooks | None
    _updating_on_step: bool
    _algorithm: Any  # EMA: the Trainer's adapter, once a Trainer runs this EMA

    def update_on_step(
        self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], model: nn.Module
    ) -> StepHooks:
        """Update the average of ``model`` after every ``optimizer.step()`` (see :mod:`emakit.ema.on_step`).

        ``optimizer``: one optimizer, or all optimizers of a training step (an update once each has stepped).
        Returns the hooks; ``hooks.remove()`` stops the updates. Refused for an EMA a Trainer runs, one already
        updating on steps, and ``ema_start`` in epochs (a step hook does not know the epoch).

        Example::

            >>> ema = EMA(half_life="100ba")
            >>> hooks = ema.update_on_step(optimizer, model)
            >>> for x, y in loader:
            ...     loss_fn(model(x), y).backward()
            ...     optimizer.step()              # the EMA updates here
            ...     optimizer.zero_grad()
            >>> hooks.remove()
        """
        from emakit.time import TimeUnit

        ema: EMA = self  # type: ignore[assignment]  # the mixin is EMA's
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        bad = [type(o).__name__ for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
        if not optimizers or bad:
            raise ValueError(f"update_on_step takes torch optimizers, got {bad or 'none'}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"update_on_step takes the model (an nn.Module), not {type(model).__name__}")
        if self._algorithm is not None:
            raise RuntimeError("update_on_step: a Trainer runs this EMA and updates it at batch ends already")
        if self._step_hooks is not None and self._step_hooks.active:
            raise RuntimeError("update_on_step: this EMA updates on optimizer steps already; hooks.remove() first")
        if ema.ema_start.unit is TimeUnit.EPOCH and ema.ema_start.value:
            raise ValueError(
                f"update_on_step: ema_start='{ema.ema_start}' counts epochs, which an optimizer's step hook does not "
                "know; give it in 'ba' or 'dur', or call ema.update(model, epoch=epoch) yourself"
            )
        self._step_hooks = StepHooks(ema, optimizers, model)
        return self._step_hooks

    def _refuse_update_beside_hooks(self) -> None:
        """Raise when ``update`` is called from elsewhere while step hooks update this EMA."""
        if self._step_hooks is not None and self._step_hooks.active and not self._updating_on_step:
            raise RuntimeError(
                "this EMA updates after every optimizer step (update_on_step): calling update() too would count "
                "each step twice; remove the hooks (hooks.remove()) to update by hand, or leave the updates to them"
            )
