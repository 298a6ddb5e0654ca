"""Swaps of an :class:`~emakit.EMA`: its average put into a model, and the training weights given back.

A swap parks the model's values and copies the average in; the way back checks every parameter byte for
byte and restores the training weights (:mod:`emakit.shadow.swaps`). Swaps of several EMAs nest.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

from emakit.batchnorm import running_statistics, update_bn
from emakit.shadow import ShadowWeights, swapped_into
from emakit.time import Time

__all__ = ["EMASwaps"]


class EMASwaps:
    """:class:`~emakit.EMA`'s swaps: :meth:`ema_weights`, :meth:`get_ema_model`, :meth:`get_training_model`,
    :meth:`training_weights`, and :meth:`update_bn`, which measures BatchNorm statistics for the average inside
    a swap."""

    shadows: list[ShadowWeights]
    shadow: ShadowWeights
    started: bool
    ema_start: Time

    attach: Callable[[nn.Module], None]  # EMA

    def _require_average(self) -> None:
        if not self.started:
            raise RuntimeError(
                "the EMA has not started: no update event has reached ema_start "
                f"('{self.ema_start}') yet, so there are no EMA weights"
            )

    def _average(self, index: int) -> ShadowWeights:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.shadows):
            raise ValueError(f"index={index!r} must be an int in [0, {len(self.shadows)}): this EMA keeps that many")
        return self.shadows[index]

    @property
    def swapped(self) -> bool:
        """Whether one of this EMA's averages is in the model now."""
        return any(shadow.swapped for shadow in self.shadows)

    def get_ema_model(self, model: nn.Module, index: int = 0) -> nn.Module:
        """Put average ``index`` into ``model`` and return it (see :meth:`ema_weights`)."""
        shadow = self._average(index)
        self._require_average()
        if not shadow.swapped:
            shadow.swap_in(model)
        return model

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """Put ``model``'s training weights back (bit for bit) and return it."""
        for shadow in swapped_into(model)[::-1]:
            if any(shadow is mine for mine in self.shadows):
                shadow.swap_out(model)
        return model

    def ema_weights(self, model: nn.Module, index: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        """Inside the block ``model`` holds average ``index`` (the first by default); on exit its own weights again.

        On exit the training weights are back bit for bit and the average is as it was: buffers
        (BatchNorm statistics a train-mode forward updates) are restored from a copy, and a
        parameter written in place inside the block makes the exit raise, naming it. Autograd
        across the block's edges raises (the swap is an in-place change of the parameters).
        Swaps nest: an inner block of another EMA must end first.
        """
        return _EMAWeights(self, model, self._average(index))

    @contextlib.contextmanager
    def training_weights(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds its training weights, even while this EMA's averages are swapped in.

        This EMA's averages in ``model`` come out for the block (innermost first) and go back in after it;
        other EMAs' swaps are left alone. E.g. a checkpoint of the training weights from inside an evaluation::

            with ema.ema_weights(model):
                evaluate(model)
                with ema.training_weights(model):
                    torch.save(model.state_dict(), "training.pt")
        """
        if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
            warnings.warn(  # the trainer's State, as when the EMA was an Algorithm itself
                "EMA.training_weights(state) is deprecated: pass the model, ema.training_weights(state.model)",
                DeprecationWarning,
                stacklevel=3,
            )
            model = model.model
        swapped = [shadow for shadow in swapped_into(model) if any(shadow is mine for mine in self.shadows)]
        for shadow in reversed(swapped):
            shadow.swap_out(model)
        try:
            yield model
        finally:
            for shadow in swapped:
                shadow.swap_in(model)

    def update_bn(self, loader: Iterable, model: nn.Module, **kwargs: Any) -> None:
        """Measure the average's own BatchNorm statistics over ``loader`` (see :func:`emakit.update_bn`).

        The average's parameters are swapped in, every BatchNorm layer's running statistics are
        recomputed over one pass, stored as the average's buffers, and the training weights and their
        statistics go back unchanged. Keyword arguments (``device``, ``inputs``) go to :func:`emakit.update_bn`.
        """
        self._require_average()
        self.attach(model)
        untracked = [name for name in running_statistics(model) if name not in self.shadow.state_dict_keys]
        if untracked:
            raise ValueError(
                f"update_bn: this EMA does not track the BatchNorm statistics {', '.join(untracked[:5])} "
                f"(buffers={self.shadow.selection.buffers!r}, include/exclude patterns): the average has no place "
                "to keep them, and measuring them would overwrite the training model's; track them "
                "(buffers='average' or 'copy', patterns that keep them) or call emakit.update_bn on a model you own"
            )
        for index, shadow in enumerate(self.shadows):  # every average gets statistics of its own
            with self.ema_weights(model, index):
                update_bn(loader, model, **kwargs)
                shadow.keep_buffers_from_model()


class _EMAWeights(contextlib.AbstractContextManager):
    """``with ema.ema_weights(model):`` — a plain class rather than a generator: cheaper to enter and leave."""

    def __init__(self, ema: EMASwaps, model: nn.Module, shadow: ShadowWeights) -> None:
        self.ema, self.model, self.shadow = ema, model, shadow

    def __enter__(self) -> nn.Module:
        self.ema._require_average()
        self.already_in = self.shadow.swapped
        if not self.already_in:
            self.shadow.swap_in(self.model)
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if not self.already_in:
            self.shadow.swap_out(self.model)
