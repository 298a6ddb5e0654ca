"""The EMA storage engine: the averaged weights of one model, kept in flat buffers of its own.

Layout. The model's tracked tensors (see :mod:`emakit.tracked`: what ``state_dict()`` holds)
are grouped by (kind, device, dtype), kind being parameters, buffers (both averaged) or
integer buffers (copied). Per group the average lives in one flat buffer; each tensor's
average is its slice, with its own storage object. See :mod:`emakit.flat` for the kernels.

By default the model's tensors are never re-pointed: nothing another library or the user holds
(an optimizer's bucket views, shared memory, numpy views, CUDA graph addresses, aliases) is
invalidated. An update reads each tensor once (``torch._foreach_lerp_``). A swap exchanges
the contents of parameters with their average, chunk by chunk, and parks a copy of buffers,
so evaluation holds the model plus one average and whatever runs inside a swap (a train-mode
forward, an optimizer step) never silently reaches the average: a parameter written in place
during a swap makes ``swap_out`` raise, naming it.

``flatten_model=True`` binds the model's tensors into one flat buffer per group (each keeps
its own storage object): an update is one ``lerp_`` per group and a parameter swap exchanges
storage pointers. See the README for what this changes about the model.

Staleness. Before every use :class:`~emakit.tracked.TrackedTensors` checks, without a Python
loop per tensor, that the model still holds the same tensors at the same addresses. A moved
``.data`` of the same shape is followed (re-bound under ``flatten_model``); a replaced tensor of
the same shape keeps its average; a new or reshaped tensor starts its average from its value
(with a warning); the groups are laid out again, carrying the average over by name.
"""

from __future__ import annotations

import collections
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from emakit.average_module import average_module, gathered_module
from emakit.side_stream import CUDA, SideStream, StreamOps
from emakit.storage import BoundGroup, CastGroup, Group, InPlaceGroup
from emakit.storage.layout import is_dense, normalize_device
from emakit.tracked import (
    EVERYTHING,
    Change,
    Selection,
    TrackedTensors,
    describe_mismatch,
    local,
    match_wrapped_names,
    unwrap,
    weightless_copy,
)

__all__ = ["ShadowWeights", "resolve_ema_dtype", "swapped_into"]

# Per model, the averages swapped into it, innermost last: swaps must nest.
_swaps: weakref.WeakKeyDictionary[nn.Module, list[ShadowWeights]] = weakref.WeakKeyDictionary()
# Per model, the flatten_model average its tensors are bound to: a model's tensors live in one place.
_bound: weakref.WeakKeyDictionary[nn.Module, ShadowWeights] = weakref.WeakKeyDictionary()


def swapped_into(model: nn.Module) -> list[ShadowWeights]:
    """The averages swapped into ``model`` now, innermost last."""
    return list(_swaps.get(unwrap(model), []))


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
    """Per name, what a tensor must keep for its average to carry on in place: kind, dtype, device, shape."""
    return {name: (_kind(t, selection), local(t).dtype, local(t).device, t.shape) for name, t in named.items()}


def _like_model(model_tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (local data) presented like ``model_tensor``: a DTensor with its mesh and placements, or as is."""
    if not isinstance(model_tensor, DTensor):
        return value
    return DTensor.from_local(
        value,
        model_tensor.device_mesh,
        model_tensor.placements,
        run_check=False,
        shape=model_tensor.shape,
        stride=model_tensor.stride(),
    )


class ShadowWeights:
    """The average of one model's weights, in flat buffers, with update, swap and state.

    It knows nothing of schedules: callers say when to update and with which weight.

    Example::

        >>> model = nn.Linear(4, 4)
        >>> shadow = ShadowWeights()
        >>> shadow.copy_from_model(model)            # start the average at the weights
        >>> shadow.update(model, weight=0.01)         # ema = 0.99 * ema + 0.01 * param
        >>> shadow.swap_in(model)                     # the model now holds the average
        >>> shadow.swap_out(model)                    # and its own weights again, bit for bit
    """

    def __init__(
        self,
        ema_dtype: str | torch.dtype = "auto",
        ema_device: str | torch.device | None = None,
        async_update: bool = False,
        flatten_model: bool = False,
        selection: Selection = EVERYTHING,
        stream_ops: StreamOps = CUDA,
    ) -> None:
        resolve_ema_dtype(ema_dtype, torch.float32)  # validates
        for name, flag in (("async_update", async_update), ("flatten_model", flatten_model)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False")
        self.ema_dtype = ema_dtype
        try:
            self.ema_device = None if ema_device is None else torch.device(ema_device)
        except RuntimeError as error:
            raise ValueError(f"ema_device={ema_device!r} is not a torch device: {error}") from None
        self.async_update = async_update
        self.flatten_model = flatten_model
        self.selection = selection
        self._stream_ops = stream_ops  # the device calls of asynchronous updates (CUDA's)
        self._side_stream: SideStream | None = None
        self._generation = 0  # counts the layouts and followed changes of the model's tensors
        self._streamed = -1  # the generation whose memory the side stream was told of
        self._groups: list[Group] = []
        self._model: nn.Module | None = None  # the model the groups are laid out for (held: ema_model needs it)
        self._tracked: TrackedTensors | None = None  # its tensors, and the check that they are current
        self._key: dict[str, tuple] = {}  # per tracked name: what must stay the same to keep the layout
        self._pending: dict[str, torch.Tensor] | None = None  # loaded before any model was seen
        self._skeleton: nn.Module | None = None  # a weightless copy of the model, for ema_model under FSDP
        self._snapshot: nn.Module | None = None  # ema_model: a copy of the average, until the average changes
        self.state_dict_keys: dict[str, str] = {}  # the model's state_dict key -> tracked name (tied: several)

    # ----------------------------------------------------------------- layout
    @property
    def swapped(self) -> bool:
        """Whether the average is in the model right now (between ``swap_in`` and ``swap_out``)."""
        return any(group.swapped for group in self._groups)

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
        if self._groups:
            self._layout(model, dict(self._current()), strict=self._model is not model)
        else:
            self._layout(model, self._pending, strict=True)
        self._pending = None
        return model

    def _follow(self, tracked: TrackedTensors) -> None:
        """Take the model's current tensor objects into the groups; bound ones go back into their slices."""
        for group in self._groups:
            group.follow([tracked.named[name] for name in group.names])
        tracked.accept_moves()
        self._tracked = tracked
        self._generation += 1

    def _layout(self, model: nn.Module, carried: dict[str, torch.Tensor] | None, strict: bool) -> None:
        tracked = TrackedTensors(model, self.selection)
        named = tracked.named
        if not any(_kind(t, self.selection) != "copied" for t in named.values()):
            raise ValueError(
                f"{type(model).__name__} has no floating-point parameters or buffers to average"
                + ("" if self.selection == EVERYTHING else f" among those selected ({self.selection})")
            )
        if carried is not None:
            carried = self._carry(match_wrapped_names(carried, named), named, strict)
        bind = self.flatten_model and _bound.get(model, self) is self
        if self.flatten_model and not bind:
            raise ValueError(
                f"{type(model).__name__}'s tensors are already bound by another EMA with flatten_model=True: "
                "a model's tensors can live in one flat buffer only; use the default flatten_model=False here"
            )
        data_of = {id(t): local(t) for t in named.values()}
        sharing = collections.Counter(t.untyped_storage()._cdata for t in data_of.values())

        def bindable(t: torch.Tensor) -> bool:
            """Dense plain tensors alone in their storage (bound tensors have a storage each: they stay bindable)."""
            if not bind or type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):  # DTensor shards, subclasses
                return False
            return sharing[t.untyped_storage()._cdata] == 1 and is_dense(t)

        keyed: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, t in named.items():
            data = data_of[id(t)]
            keyed.setdefault((_kind(t, self.selection), data.device, data.dtype, bindable(t)), []).append((name, t))
        self._groups = []  # the old average stays alive through `carried` only
        self._snapshot = None
        for (kind, device, dtype, bound), entries in keyed.items():
            ema_dtype = dtype if kind == "copied" else resolve_ema_dtype(self.ema_dtype, dtype)
            ema_device = normalize_device(self.ema_device or device)
            mode = BoundGroup if bound else InPlaceGroup if (ema_dtype, ema_device) == (dtype, device) else CastGroup
            self._groups.append(mode(kind, entries, ema_dtype, ema_device, start=carried))
        tracked.accept_moves()  # binding moved the bound tensors
        self._model, self._tracked, self._key = model, tracked, _layout_key(named, self.selection)
        self._generation += 1
        if bind:
            _bound[model] = self
        name_of = {id(t): name for name, t in named.items()}
        self.state_dict_keys = {
            key: name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in name_of
        }

    @staticmethod
    def _carry(
        carried: dict[str, torch.Tensor], named: dict[str, torch.Tensor], strict: bool
    ) -> dict[str, torch.Tensor]:
        """The carried average for every tracked tensor: loaded states must match; a live model may have changed."""
        mismatch = describe_mismatch(carried, named, "the model") or describe_mismatch(named, carried, "the EMA")
        if mismatch is None:
            return carried
        if strict:
            raise ValueError(f"the model does not match the EMA's tensors: {mismatch}")
        fresh = [n for n, t in named.items() if n not in carried or carried[n].shape != t.shape]
        gone = [n for n in carried if n not in named]
        warnings.warn(
            f"EMA: the model's tensors changed: {len(fresh)} new or reshaped ({', '.join(fresh[:5])}) start "
            f"their average from their current values; {len(gone)} gone ({', '.join(gone[:5])}) are dropped",
            RuntimeWarning,
            stacklevel=5,
        )
        return {n: t if n in fresh else carried[n] for n, t in named.items()}

    # ------------------------------------------------------------- operations
    def _settle(self) -> None:
        """Order what comes next after any update still running asynchronously, and wait for its host half."""
        if self._side_stream is not None:
            self._side_stream.finish()

    def wait(self) -> None:
        """Make the device's current stream wait for a pending asynchronous update (the host does not block).

        Call it before writing the model's parameters outside ``optimizer.step()`` (which waits by
        itself), e.g. a weight clamp right after ``ema.update(model)``.
        """
        if self._side_stream is not None:
            self._side_stream.wait()

    def _checked(self, model: nn.Module, action: str) -> None:
        self._settle()
        if self.swapped or _swaps.get(unwrap(model)):
            raise RuntimeError(
                f"cannot {action}: EMA weights are swapped into the model; "
                "leave ema_weights(...) or call get_training_model(model) first"
            )
        self.attach(model)

    @torch.no_grad()
    def update(self, model: nn.Module, weight: float) -> None:
        """``ema = ema + weight * (param - ema)`` for averaged tensors; copy the others."""
        self._checked(model, "update the EMA")
        self._snapshot = None
        if self.async_update and self._asynchronous_device() is not None:
            self._update_asynchronously(weight)
            return
        for group in self._groups:
            group.update(weight)

    def _asynchronous_device(self) -> torch.device | None:
        """The one CUDA device of the model, where updates may run on a side stream; else None, with a warning."""
        devices = {group.device for group in self._groups}
        device = next(iter(devices))
        if len(devices) == 1 and self._stream_ops.supports(device):
            return device
        warnings.warn(
            f"async_update=True needs a model on one CUDA device, not {sorted(map(str, devices))}: "
            "updating synchronously",
            stacklevel=4,
        )
        self.async_update = False
        return None

    def _update_asynchronously(self, weight: float) -> None:
        """Buffers now, on the current stream (the next forward writes them); parameters on the side stream; the
        host half of an offloaded average on a worker thread. See :mod:`emakit.side_stream`."""
        device = self._groups[0].device
        if self._side_stream is None:
            self._side_stream = SideStream(self._stream_ops)
        if self._streamed != self._generation:  # new tensor memory: used by the side stream too
            self._side_stream.keep_alive(device, [t for group in self._groups for t in group.memory()])
            self._streamed = self._generation
        for group in self._groups:
            if group.kind != "parameters":
                group.update(weight)
        on_device = [g for g in self._groups if g.kind == "parameters" and not g.pinned]
        on_host = [g for g in self._groups if g.kind == "parameters" and g.pinned]

        def device_work() -> None:
            for group in on_device:
                group.update(weight)
            for group in on_host:
                group.stage()

        def host_work() -> None:
            for group in on_host:
                group.lerp_staged(weight)

        self._side_stream.run(device, device_work, host_work if on_host else None)

    @torch.no_grad()
    def model_is_finite(self, model: nn.Module) -> bool:
        """Whether every averaged tensor of the model is free of NaN and Inf (one read of the weights)."""
        self._checked(model, "check the model's weights")
        return all(bool(group.all_finite()) for group in self._groups if group.kind != "copied")

    @torch.no_grad()
    def copy_from_model(self, model: nn.Module) -> None:
        """Set the average to the model's weights (the start of an EMA)."""
        self._checked(model, "reset the EMA")
        self._snapshot = None
        for group in self._groups:
            group.copy_from_model()

    @torch.no_grad()
    def copy_to_model(self, model: nn.Module) -> None:
        """Set the model's weights to the average (cast to the model's dtype)."""
        self._checked(model, "copy the EMA into the model")
        for group in self._groups:
            group.copy_to_model()

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
        outer = _swaps.setdefault(model, [])
        if outer:  # the innermost swap so far notes what was written under it: from here on writes are this one's
            for group in outer[-1]._groups:
                group.note_writes()
        for group in self._groups:
            group.swap_in()
        outer.append(self)

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

    # ------------------------------------------------------------------ state
    def _current(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            for name, tensor, holder in group.current_averages():
                yield name, _like_model(tensor, holder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by the model's tensor names (copies while swapped in; empty before any model)."""
        self._settle()
        if not self._groups:
            return dict(self._pending or {})
        if self.swapped:
            return {name: t.detach().clone() for name, t in self._current()}
        return {name: t.detach() for name, t in self._current()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the average from ``state`` (as :meth:`state_dict` gives it), now or at the next attach."""
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"EMA state must map tensor names to tensors; entry {bad!r} does not")
        self._settle()
        if not state:  # the state of an average that has not started: nothing to restore
            return
        if not self._groups:
            self._pending = {name: tensor.detach().clone() for name, tensor in state.items()}
            return
        if self.swapped:
            raise RuntimeError("cannot load EMA state while the EMA weights are swapped in")
        self._snapshot = None
        current = dict(self._current())
        state = match_wrapped_names(state, current)
        mismatch = describe_mismatch(current, state, "the loaded EMA state") or describe_mismatch(
            state, current, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"EMA state does not match the model: {mismatch}")
        for name, tensor in current.items():
            tensor.copy_(state[name])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The average keyed like the model's ``state_dict`` (tied tensors: one copy under each of their names),
        detached copies the EMA never writes again. Sharded averages are gathered (collective: every rank calls)."""
        averages = self.state_dict()
        copies: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(self.state_dict_keys.values()):
            value = averages[name]
            copies[name] = value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()
        return {key: copies[name] for key, name in self.state_dict_keys.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held by the average."""
        return sum(group.nbytes for group in self._groups)

    # ------------------------------------------------------------- ema_model
    def module(self, model: nn.Module) -> nn.Module:
        """A module of ``model``'s type holding a copy of the average, made at the first call after the average
        changed (see :mod:`emakit.average_module`): writes to it, ``.to()`` or ``.half()`` leave the average alone.

        For a sharded (FSDP2) model it is a plain, unsharded module holding the full average, gathered
        (collective: call it on every rank).
        """
        self._settle()
        model = self.attach(model) if not self.swapped else unwrap(model)
        if self._snapshot is None:
            if any(group.sharded for group in self._groups):
                self._snapshot = gathered_module(self._skeleton, dict(self._current()))
            else:
                averages = [entry for group in self._groups for entry in group.current_averages()]
                self._snapshot = average_module(model, averages)
        return self._snapshot
