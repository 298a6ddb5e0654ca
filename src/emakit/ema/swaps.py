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

    labels: property  # EMA's: a short name per average

    _stored: dict[int, ShadowWeights | None]  # store(model) .. restore(model): id(model) -> what copy_to swapped in

    def _require_average(self) -> None:
        if not self.started:
            raise RuntimeError(
                "the EMA has not started: no update event has reached ema_start "
                f"('{self.ema_start}') yet, so there are no EMA weights"
            )

    def _average(self, index: int | str) -> ShadowWeights:
        """Average ``index``: its position (from 0), or its label (``"ema@200ba"`` or ``"200ba"``: :attr:`labels`)."""
        if isinstance(index, str):
            labels = self.labels
            for position, label in enumerate(labels):
                if index in (label, label.removeprefix("ema@")):
                    return self.shadows[position]
            raise ValueError(f"index={index!r} names no average of this EMA: its labels are {labels}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.shadows):
            raise ValueError(
                f"index={index!r} must be an int in [0, {len(self.shadows)}) or a label of {self.labels}: this EMA "
                "keeps that many averages"
            )
        return self.shadows[index]

    @property
    def swapped(self) -> bool:
        """Whether one of this EMA's averages is in the model now."""
        return any(shadow.swapped for shadow in self.shadows)

    def get_ema_model(self, model: nn.Module, index: int | str = 0) -> nn.Module:
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

    def ema_weights(self, model: nn.Module, index: int | str = 0) -> contextlib.AbstractContextManager[nn.Module]:
        """Inside the block ``model`` holds average ``index`` (the first by default); on exit its own weights again.

        On exit the training weights are back bit for bit and the average is as it was: buffers
        (BatchNorm statistics a train-mode forward updates) are restored from a copy, and a
        parameter written in place inside the block makes the exit raise, naming it. Autograd
        across the block's edges raises (the swap is an in-place change of the parameters).
        Swaps nest: an inner block of another EMA must end first.
        """
        return _EMAWeights(self, model, self._average(index))

    def copy_to(self, model: nn.Module, index: int | str = 0) -> None:
        """Set ``model``'s weights to average ``index`` — for good, as diffusers' and torch_ema's ``copy_to`` do;
        between :meth:`store` and :meth:`restore` it is a swap instead (:meth:`ema_weights`' safety).

        For good: the training weights are overwritten (and under DeepSpeed, the optimizer's fp32 masters with
        them), e.g. at the end of training. To evaluate and go on training, use ``with ema.ema_weights(model):``.
        """
        model = _module(model, "copy_to")
        shadow = self._average(index)
        self._require_average()
        if id(model) in self._stored:
            if self._stored[id(model)] is not None:
                raise RuntimeError("copy_to: an average is already in the model since store(); restore(model) first")
            self._stored[id(model)] = shadow
            shadow.swap_in(model)
            return
        if shadow.swapped:
            raise RuntimeError("copy_to: this average is swapped into the model; leave ema_weights(...) first")
        shadow.copy_to_model(model)

    def store(self, model: nn.Module) -> None:
        """Keep ``model``'s training weights for :meth:`restore`: the torch_ema / diffusers way to evaluate::

            ema.store(model)        # then copy_to swaps the average in: the training weights are parked
            ema.copy_to(model)
            evaluate(model)
            ema.restore(model)      # training weights back bit for bit; a write inside raises, naming it

        The same as ``with ema.ema_weights(model):`` (prefer it: it cannot forget the restore).
        """
        model = _module(model, "store")
        if id(model) in self._stored:
            raise RuntimeError("store: the model's weights are already stored; restore(model) first")
        self._stored[id(model)] = None

    def restore(self, model: nn.Module) -> None:
        """Put back the training weights :meth:`store` kept (see there); after a :meth:`copy_to` in between, the
        model's parameters are checked byte for byte first: a write to them raises, naming it."""
        model = _module(model, "restore")
        stored = self._stored
        if id(model) not in stored:
            raise RuntimeError("restore: nothing is stored for this model; call store(model) first")
        shadow = stored.pop(id(model))
        if shadow is not None:
            shadow.swap_out(model)

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


def _module(model: object, method: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"{method} takes the model (an nn.Module), not {type(model).__name__}: emakit tracks the model's parameters "
        f"and buffers by name, e.g. ema.{method}(model) rather than ema.{method}(model.parameters())"
    )


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
