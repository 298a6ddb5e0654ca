"""The EMA storage engine: the averaged weights of one model, kept in flat buffers.

Layout. The model's tracked tensors (see :mod:`emakit.tracked`) are grouped by
(kind, device, dtype), where kind is *averaged* (floating point) or *copied* (integer). Per
group the EMA lives in one flat buffer. The model's own tensors of the group are *bound*
into a flat buffer of the same layout: ``tensor.data`` becomes a view of it, so the
``Parameter`` objects stay the same and optimizers built before or after keep working.
Then, per group::

    update:    ema_flat.lerp_(model_flat, 1 - smoothing)    one kernel: the memory-bandwidth roofline
    swap in:   exchange the two buffers' data pointers       O(1), no weight data moved
    swap out:  exchange them back                            the training weights, bit for bit

When the EMA's dtype or device differs from the model's (an fp32 EMA of a bf16 model, an
EMA kept on the CPU), swap-in parks the training weights in a fresh buffer by the same
pointer exchange and cast-copies the EMA in; swap-out exchanges back and frees it.

Tensors that cannot be bound (not dense, tensor subclasses, storage shared with another
tracked tensor) are kept *loose* and updated with ``torch._foreach_lerp_``.

Staleness. A binding breaks when the model's tensors are re-pointed (``model.to(...)``,
``load_state_dict(assign=True)``, a replaced ``Parameter``). Before every use the engine
checks two cheap signals: the process-wide module-registration counter and the use count
of each bound storage. When either moved it walks the model; if anything changed it lays
the groups out again, carrying the EMA over by name. It never averages stale tensors.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from emakit.tracked import describe_mismatch, is_averaged, structure_generation, tracked_tensors, unwrap

__all__ = ["ShadowWeights", "resolve_ema_dtype"]

_ALIGN_BYTES = 64
_CAST_CHUNK = 1 << 22  # elements per cast-and-lerp step when dtypes differ: bounds the temporary


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


def _use_count(tensor: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(tensor.untyped_storage()._cdata)


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _exchange_data(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the memory behind the storages of ``a`` and ``b`` (equal size): views follow, nothing is copied."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.nbytes() != sb.nbytes() or a.device != b.device:
        raise RuntimeError("internal error: exchanging storages of different sizes or devices")
    if hasattr(sa, "_swap_data_ptr_"):
        sa._swap_data_ptr_(sb)
    else:  # torch without the pointer exchange: three copies, same result
        parked = a.clone()
        a.copy_(b)
        b.copy_(parked)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements of its storage, in any dim order."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _cast_lerp_(ema: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    """``ema.lerp_(source, weight)`` for flat tensors, casting ``source`` to ``ema``'s dtype and device."""
    if source.dtype == ema.dtype and source.device == ema.device:
        ema.lerp_(source, weight)
        return
    for start in range(0, ema.numel(), _CAST_CHUNK):
        stop = start + _CAST_CHUNK
        ema[start:stop].lerp_(source[start:stop].to(device=ema.device, dtype=ema.dtype), weight)


@dataclass
class _Group:
    """The model's tensors of one (kind, device, dtype) and their average."""

    averaged: bool
    names: list[str]
    tensors: list[torch.Tensor]  # the model's own Parameter and buffer objects
    ema_flat: torch.Tensor
    ema_views: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)
    model_flat: torch.Tensor | None = None  # None: the tensors are loose, not bound
    use_count: int | None = None
    parked: list[torch.Tensor] | torch.Tensor | None = None  # training weights during a swap

    @property
    def exchangeable(self) -> bool:
        flat = self.model_flat
        return flat is not None and flat.dtype == self.ema_flat.dtype and flat.device == self.ema_flat.device

    def intact(self) -> bool:
        """Whether the model's tensors are still where the group expects them."""
        if self.model_flat is None:
            first = self.tensors[0]
            return all(t.dtype == first.dtype and t.device == first.device for t in self.tensors)
        count = _use_count(self.model_flat)
        if count is not None and count == self.use_count:
            return True
        storage = _storage_id(self.model_flat)
        if all(_storage_id(t) == storage and t.storage_offset() == o for t, o in zip(self.tensors, self.offsets)):
            self.use_count = _use_count(self.model_flat)
            return True
        return False

    def update(self, weight: float) -> None:
        if not self.averaged:
            self.copy_from_model()
        elif self.model_flat is not None:
            _cast_lerp_(self.ema_flat, self.model_flat, weight)
        else:
            sources = [t.detach().to(device=self.ema_flat.device, dtype=self.ema_flat.dtype) for t in self.tensors]
            torch._foreach_lerp_(self.ema_views, sources, weight)

    def copy_from_model(self) -> None:
        if self.model_flat is not None:
            self.ema_flat.copy_(self.model_flat)
        else:
            for view, tensor in zip(self.ema_views, self.tensors):
                view.copy_(tensor)

    def copy_to_model(self) -> None:
        if self.model_flat is not None:
            self.model_flat.copy_(self.ema_flat)
        else:
            for view, tensor in zip(self.ema_views, self.tensors):
                tensor.copy_(view)

    def swap_in(self) -> None:
        if self.exchangeable:
            _exchange_data(self.model_flat, self.ema_flat)
        elif self.model_flat is not None:
            self.parked = torch.empty_like(self.model_flat)
            _exchange_data(self.model_flat, self.parked)
            self.model_flat.copy_(self.ema_flat)
        else:
            self.parked = [t.detach().clone() for t in self.tensors]
            self.copy_to_model()

    def swap_out(self) -> None:
        if self.exchangeable:
            _exchange_data(self.model_flat, self.ema_flat)
        elif self.model_flat is not None:
            _exchange_data(self.model_flat, self.parked)
        else:
            for tensor, parked in zip(self.tensors, self.parked):
                tensor.copy_(parked)
        self.parked = None

    def current_ema(self, swapped: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` holding the average now: in the model's tensors while exchanged in."""
        holders = self.tensors if swapped and self.exchangeable else self.ema_views
        yield from zip(self.names, holders)


def _flat_views(flat: torch.Tensor, like: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, at ``offsets``; in their memory format where they are dense."""
    return [
        flat.as_strided(t.shape, t.stride() if _is_dense(t) else torch.empty(t.shape, device="meta").stride(), o)
        for t, o in zip(like, offsets)
    ]


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

    def __init__(self, ema_dtype: str | torch.dtype = "auto", ema_device: str | torch.device | None = None) -> None:
        resolve_ema_dtype(ema_dtype, torch.float32)  # validates
        self.ema_dtype = ema_dtype
        self.ema_device = None if ema_device is None else torch.device(ema_device)
        self._groups: list[_Group] = []
        self._model: weakref.ref | None = None
        self._generation = -1
        self._pending: dict[str, torch.Tensor] | None = None  # loaded before any model was seen
        self._swapped = False
        self._module: nn.Module | None = None

    # ----------------------------------------------------------------- layout
    @property
    def swapped(self) -> bool:
        """Whether the average is in the model right now (between ``swap_in`` and ``swap_out``)."""
        return self._swapped

    def attached_model(self) -> nn.Module | None:
        """The (unwrapped) model the groups are laid out for, if it is still alive."""
        return None if self._model is None else self._model()

    def attach(self, model: nn.Module) -> nn.Module:
        """Lay the groups out for ``model`` unless they are current; returns the unwrapped model."""
        model = unwrap(model)
        if self._model is not None and self._model() is model and self._current(model):
            return model
        if self._swapped:
            raise RuntimeError(
                "the model's tensors changed while the EMA weights were swapped in; swap them out first"
            )
        carried = self._pending if not self._groups else dict(self._iter_current())
        self._layout(model, carried)
        self._pending = None
        return model

    def _current(self, model: nn.Module) -> bool:
        if self._generation != structure_generation():
            tensors = [t for g in self._groups for t in g.tensors]
            walked = [t for _, t in tracked_tensors(model)]
            if len(walked) != len(tensors) or {id(t) for t in walked} != {id(t) for t in tensors}:
                return False
            self._generation = structure_generation()
        return all(group.intact() for group in self._groups)

    def _layout(self, model: nn.Module, carried: dict[str, torch.Tensor] | None) -> None:
        generation = structure_generation()
        named = dict(tracked_tensors(model))
        if not any(is_averaged(t) for t in named.values()):
            raise ValueError(f"{type(model).__name__} has no floating-point parameters or buffers to average")
        if carried is not None:
            mismatch = describe_mismatch(carried, named, "the model") or describe_mismatch(named, carried, "the EMA")
            if mismatch is not None:
                raise ValueError(f"the model does not match the EMA's tensors: {mismatch}")
        storages: dict[int, int] = {}
        for t in named.values():
            storages[_storage_id(t)] = storages.get(_storage_id(t), 0) + 1
        own_flats = {_storage_id(g.model_flat) for g in self._groups if g.model_flat is not None}

        def bindable(t: torch.Tensor) -> bool:
            plain = type(t) in (torch.Tensor, nn.Parameter, nn.Buffer)
            alone = storages[_storage_id(t)] == 1 or _storage_id(t) in own_flats
            return plain and alone and _is_dense(t)

        keys: dict[tuple, list[str]] = {}
        for name, t in named.items():
            keys.setdefault((is_averaged(t), t.device, t.dtype, bindable(t)), []).append(name)
        self._groups = [
            self._make_group(averaged, device, dtype, bind, names, named, carried)
            for (averaged, device, dtype, bind), names in keys.items()
        ]
        self._model = weakref.ref(model)
        self._generation = generation
        self._module = None

    def _make_group(self, averaged, device, dtype, bind, names, named, carried) -> _Group:
        tensors = [named[n] for n in names]
        ema_dtype = resolve_ema_dtype(self.ema_dtype, dtype) if averaged else dtype
        ema_device = self.ema_device or device
        step = max(1, _ALIGN_BYTES // max(torch.empty((), dtype=dtype).element_size(),
                                          torch.empty((), dtype=ema_dtype).element_size()))
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() // step) * step
        ema_flat = torch.zeros(total, dtype=ema_dtype, device=ema_device)
        if ema_device.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
            ema_flat = ema_flat.pin_memory()
        group = _Group(averaged, names, tensors, ema_flat, _flat_views(ema_flat, tensors, offsets), offsets)
        with torch.no_grad():
            for name, view, t in zip(names, group.ema_views, tensors):
                view.copy_(carried[name] if carried is not None else t)
            if bind:
                group.model_flat = torch.zeros(total, dtype=dtype, device=device)
                for t, view in zip(tensors, _flat_views(group.model_flat, tensors, offsets)):
                    view.copy_(t)
                    t.data = view
                group.use_count = _use_count(group.model_flat)
        return group

    # ------------------------------------------------------------- operations
    def _checked(self, model: nn.Module, action: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"cannot {action}: the EMA weights are swapped into the model; "
                "leave ema_weights(...) or call get_training_model(model) first"
            )
        self.attach(model)

    @torch.no_grad()
    def update(self, model: nn.Module, weight: float) -> None:
        """``ema = ema + weight * (param - ema)`` for averaged tensors; copy the others."""
        self._checked(model, "update the EMA")
        for group in self._groups:
            group.update(weight)

    @torch.no_grad()
    def copy_from_model(self, model: nn.Module) -> None:
        """Set the average to the model's weights (the start of an EMA)."""
        self._checked(model, "reset the EMA")
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
        """Put the average into the model; its training weights are parked, not copied, where dtypes agree."""
        self._checked(model, "swap the EMA weights in")
        for group in self._groups:
            group.swap_in()
        self._swapped = True

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> None:
        """Give the model back its training weights, bit for bit."""
        if not self._swapped:
            raise RuntimeError("the EMA weights are not swapped in")
        if self._model is None or self._model() is not unwrap(model):
            raise RuntimeError("swap_out got another model than swap_in")
        for group in self._groups:
            group.swap_out()
        self._swapped = False

    # ------------------------------------------------------------------ state
    def _iter_current(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            yield from group.current_ema(self._swapped)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by the model's tensor names (copies while swapped in; empty before any model was seen)."""
        if not self._groups:
            return dict(self._pending or {})
        if self._swapped:
            return {name: t.detach().clone() for name, t in self._iter_current()}
        return {name: t.detach() for name, t in self._iter_current()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the average from ``state`` (as :meth:`state_dict` gives it), now or at the next attach."""
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"EMA state must map tensor names to tensors; entry {bad!r} does not")
        if not self._groups:
            self._pending = dict(state)
            return
        if self._swapped:
            raise RuntimeError("cannot load EMA state while the EMA weights are swapped in")
        current = dict(self._iter_current())
        mismatch = describe_mismatch(current, state, "the loaded EMA state") or describe_mismatch(
            state, current, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"EMA state does not match the model: {mismatch}")
        for name, tensor in current.items():
            tensor.copy_(state[name])

    @property
    def nbytes(self) -> int:
        """Bytes held by the average."""
        return sum(g.ema_flat.untyped_storage().nbytes() for g in self._groups)

    def module(self, model: nn.Module) -> nn.Module:
        """A module of ``model``'s type whose tensors are the average's (no copy: it follows every update).

        While the EMA weights are swapped in, it holds the training weights instead.
        """
        model = self.attach(model)
        if self._module is None:
            memo: dict[int, object] = {}
            for group in self._groups:
                for tensor, view in zip(group.tensors, group.ema_views):
                    memo[id(tensor)] = nn.Parameter(view, requires_grad=False) if isinstance(
                        tensor, nn.Parameter) else view
            self._module = copy.deepcopy(model, memo)
        return self._module
