"""Laying an average out for a model, and following the model when its tensors change.

The model's tracked tensors are grouped by (kind, device, dtype, bound); each group gets one storage mode
(:mod:`emakit.storage`): the tensors read in place, a cast or offloaded average, or ``flatten_model``'s bound
buffer. Before every use :class:`~emakit.tracked.TrackedTensors` checks, without a Python loop per tensor, that
the model still holds the same tensors at the same addresses. A tensor replaced by one of the same name, kind,
dtype, device and shape is followed in place (its average carries on); otherwise the groups are laid out again,
carrying the average over by name: a new or reshaped tensor starts from its value (with a warning), a vanished
one is dropped.
"""

from __future__ import annotations

import collections
import enum
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

import torch
from torch import nn

from emakit.storage import BoundGroup, CastGroup, Group, InPlaceGroup
from emakit.storage.layout import is_dense, normalize_device
from emakit.storage.ranks import ENGINE, record, split_over_ranks
from emakit.storage.sharded import (
    check_partitioning,
    full_shape,
    is_sharded,
    local,
    localized,
    partitioning,
    source,
    state_dict_keys,
    state_shape,
)
from emakit.storage.sliced import SLICED
from emakit.storage.unsupported import refuse_unsupported
from emakit.tracked import (
    EVERYTHING,
    Change,
    Selection,
    TrackedTensors,
    describe_mismatch,
    match_wrapped_names,
    unwrap,
    weightless_copy,
)

__all__ = ["ShadowLayout", "resolve_ema_dtype"]


class Unknown(enum.Enum):
    """:data:`UNKNOWN`'s type: an enum, which type checkers tell from a partitioning and copies keep (deepcopy,
    pickle: an ``object()`` sentinel became another object)."""

    UNKNOWN = "unknown"


UNKNOWN: Final = Unknown.UNKNOWN  # a loaded state not saying whose partitions it holds (a PostHocEMA's, a trainer's)

# Per model, the flatten_model average its tensors are bound to: a model's tensors live in one place.
_bound: weakref.WeakKeyDictionary[nn.Module, ShadowLayout] = weakref.WeakKeyDictionary()


def resolve_ema_dtype(ema_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the average of a floating-point tensor of ``model_dtype``.

    ``"auto"``: float32 for bf16/fp16 tensors (a bf16 average with smoothing 0.9999 rounds
    every update away), the tensor's own dtype otherwise. ``"same"``: the tensor's dtype.
    A ``torch.dtype``: that dtype.
    """
    if ema_dtype == "auto":
        return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype
    if ema_dtype == "same":
        return model_dtype
    if isinstance(ema_dtype, torch.dtype) and (ema_dtype.is_floating_point or ema_dtype.is_complex):
        return ema_dtype
    raise ValueError(f"ema_dtype={ema_dtype!r} must be 'auto', 'same' or a floating-point torch.dtype")


def _kind(tensor: torch.Tensor, selection: Selection) -> str:
    is_buffer = not isinstance(tensor, nn.Parameter)
    if not selection.averages(tensor, is_buffer):
        return "copied"
    return "buffers" if is_buffer else "parameters"


def _layout_key(named: dict[str, torch.Tensor], selection: Selection) -> dict[str, tuple]:
    """Per name, what a tensor must keep for its average to carry on in place: kind, shape, the shape of this
    process's data (``fully_shard`` keeps a parameter's shape and shards its data), and the dtype and device of this
    process's data and of what its average follows (ZeRO-3's fp32 master appears at deepspeed.initialize)."""
    return {
        name: (
            _kind(t, selection),
            full_shape(t),
            local(t).shape,
            *((d.dtype, d.device) for d in (local(t), source(t))),
        )
        for name, t in named.items()
    }


class ShadowLayout:
    """:class:`~emakit.shadow.ShadowWeights`' layout: its groups, laid out for one model, following its changes."""

    _groups: list[Group]
    _model: nn.Module | None
    _tracked: TrackedTensors | None
    _key: dict[str, tuple]
    _pending: dict[str, torch.Tensor] | None
    _pending_partitioning: dict | Unknown | None
    _skeleton: nn.Module | None
    _snapshot: nn.Module | None
    _generation: int
    selection: Selection
    state_dict_keys: dict[str, str]
    ema_dtype: str | torch.dtype
    ema_device: torch.device | None
    flatten_model: bool
    shard_over_ranks: bool

    _current: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # ShadowState
    _carried: Callable[[], dict[str, torch.Tensor]]  # ShadowState
    _load_into_groups: Callable[[dict[str, torch.Tensor], dict | Unknown | None], None]  # ShadowState
    if TYPE_CHECKING:

        @property
        def swapped(self) -> bool: ...  # Swaps

    def attached_model(self) -> nn.Module | None:
        """The (unwrapped) model the groups are laid out for."""
        return self._model

    def remember_structure(self, model: nn.Module) -> None:
        """Keep a weightless copy of ``model``'s structure, so that :meth:`module` works once FSDP has sharded it."""
        self._skeleton = weightless_copy(unwrap(model))

    def attach(self, model: nn.Module) -> nn.Module:
        """Lay the groups out for ``model`` unless they are current; returns the unwrapped model.

        Tensors replaced by others of the same name, kind, dtype, device and shape (a re-registered
        buffer, ``load_state_dict(assign=True)``, ``param.data = ...``) are followed in place: their
        average carries on and nothing else is laid out again.
        """
        model = unwrap(model)
        if self._model is model:
            assert self._tracked is not None  # laid out for this model: _layout set both
            change = self._tracked.check()
            if change is Change.NONE:
                return model
            if self.swapped:
                raise RuntimeError(
                    "the model's tensors changed while the EMA weights were swapped in; swap them out first"
                )
            tracked = self._tracked if change is Change.MOVED else TrackedTensors(model, self.selection)
            if _layout_key(tracked.named, self.selection) == self._key:
                self._follow(tracked)
                return model
        elif self.swapped:
            raise RuntimeError("the EMA weights are swapped into another model; swap them out first")
        pending, saved = self._pending, self._pending_partitioning
        if self._groups:
            self._layout(model, self._carried(), strict=self._model is not model)
        elif isinstance(saved, dict) and saved.get("engine") == ENGINE and pending is not None:
            self._layout(model, None, strict=True)  # a state of slices: laid out, then each rank loads its own
            try:
                self._load_into_groups(pending, saved)
            except BaseException:
                self._groups, self._model, self._tracked = [], None, None  # refused: nothing laid out, still pending
                raise
        else:
            self._layout(model, pending, strict=True, saved_partitioning=saved)
        self._pending, self._pending_partitioning = None, UNKNOWN
        return model

    def _follow(self, tracked: TrackedTensors) -> None:
        """Take the model's current tensor objects into the groups; bound ones go back into their slices."""
        for group in self._groups:
            group.follow([tracked.named[name] for name in group.names])
        tracked.accept_moves()
        self._tracked = tracked
        self._generation += 1

    def _layout(
        self,
        model: nn.Module,
        carried: dict[str, torch.Tensor] | None,
        strict: bool,
        saved_partitioning: dict | Unknown | None = UNKNOWN,
    ) -> None:
        tracked = TrackedTensors(model, self.selection)
        named = tracked.named
        refuse_unsupported(model, named)  # placeholders of engines emakit does not understand: never averaged
        place = split_over_ranks(named, self.shard_over_ranks)  # (rank, world): parameters split 1/N, or None
        here = partitioning(named.values())
        if place is not None:
            split = sum(t.numel() for t in named.values() if _kind(t, self.selection) == "parameters")
            here = record(*place, split)
        if carried is not None and saved_partitioning is not UNKNOWN:  # a loaded state: this rank's partitions?
            check_partitioning(saved_partitioning, here)
        if not any(_kind(t, self.selection) != "copied" for t in named.values()):
            raise ValueError(
                f"{type(model).__name__} has no floating-point parameters or buffers to average"
                + ("" if self.selection == EVERYTHING else f" among those selected ({self.selection})")
            )
        if carried is not None:  # whole averages of sharded tensors: this rank's part of each
            carried = {
                n: localized(named[n], v) if n in named else v for n, v in match_wrapped_names(carried, named).items()
            }
            carried = self._carry(carried, named, strict)
        bind = self.flatten_model and _bound.get(model, self) is self
        if self.flatten_model and not bind:
            raise ValueError(
                f"{type(model).__name__}'s tensors are already bound by another EMA with flatten_model=True: "
                "a model's tensors can live in one flat buffer only; use the default flatten_model=False here"
            )
        data_of = {id(t): (local(t), source(t)) for t in named.values()}  # this process's: swapped, followed
        sharing = collections.Counter(t.untyped_storage()._cdata for t, _ in data_of.values())

        def bindable(t: torch.Tensor) -> bool:
            """Dense plain tensors alone in their storage (bound tensors have a storage each: they stay bindable)."""
            if not bind or type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer) or is_sharded(t):  # shards
                return False
            return sharing[t.untyped_storage()._cdata] == 1 and is_dense(t)

        keyed: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, t in named.items():
            data, followed = data_of[id(t)]
            key = (_kind(t, self.selection), data.device, data.dtype, followed.device, followed.dtype, bindable(t))
            keyed.setdefault(key, []).append((name, t))
        self._groups = []  # the old average stays alive through `carried` only
        self._snapshot = None
        for (kind, device, dtype, source_device, source_dtype, bound), entries in keyed.items():
            ema_dtype = dtype if kind == "copied" else resolve_ema_dtype(self.ema_dtype, dtype)
            ema_device = normalize_device(self.ema_device or device)
            in_place = (ema_dtype, ema_device) == (source_dtype, source_device)  # an update reads the sources as is
            mode: type[Group] = BoundGroup if bound else InPlaceGroup if in_place else CastGroup
            if place is not None and kind == "parameters":  # each rank keeps its slice (buffers stay whole)
                mode = SLICED[mode]
            self._groups.append(mode(kind, entries, ema_dtype, ema_device, start=carried))
        tracked.accept_moves()  # binding moved the bound tensors
        self._model, self._tracked, self._key = model, tracked, _layout_key(named, self.selection)
        self._generation += 1
        if bind:
            _bound[model] = self
        self.state_dict_keys = state_dict_keys(model, named)  # the unwrapped model's keys -> export names

    @staticmethod
    def _carry(
        carried: dict[str, torch.Tensor], named: dict[str, torch.Tensor], strict: bool
    ) -> dict[str, torch.Tensor]:
        """The carried average for every tracked tensor: loaded states must match; a live model may have changed.

        Shapes are compared as a state holds them (:func:`~emakit.storage.sharded.state_shape`: a ZeRO-3
        partition's); a new or reshaped tensor starts from the data its average follows."""
        shapes = {n: state_shape(t) for n, t in named.items()}
        mismatch = describe_mismatch(carried, shapes, "the model") or describe_mismatch(shapes, carried, "the EMA")
        if mismatch is None:
            return carried
        if strict:
            raise ValueError(f"the model does not match the EMA's tensors: {mismatch}")
        fresh = [n for n in named if n not in carried or carried[n].shape != shapes[n]]
        gone = [n for n in carried if n not in named]
        warnings.warn(
            f"EMA: the model's tensors changed: {len(fresh)} new or reshaped ({', '.join(fresh[:5])}) start "
            f"their average from their current values; {len(gone)} gone ({', '.join(gone[:5])}) are dropped",
            RuntimeWarning,
            stacklevel=5,
        )
        return {n: source(t) if n in fresh else carried[n] for n, t in named.items()}
