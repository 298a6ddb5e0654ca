"""Which tensors of a model an EMA tracks, by name, and a cheap check that they are still the model's.

An EMA averages every floating-point parameter and persistent buffer and copies every integer
buffer (BatchNorm's ``num_batches_tracked``): exactly what ``model.state_dict()`` holds.
Non-persistent buffers are caches (rotary tables, attention masks) and stay the model's own.
Tensors are named as in ``model.state_dict()``; a tensor shared by several modules (tied
weights) is tracked once, under its first name.

Python-level walks over a model cost more than averaging a model of many small tensors, so
callers keep a :class:`TrackedTensors` and ask :meth:`TrackedTensors.check` before each use:
a few C-level passes over the model's registries (no Python loop per tensor) that see a
replaced ``Parameter``, a re-registered buffer, a new or removed layer, and a tensor whose
``.data`` was re-pointed.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import fnmatch
import itertools
import operator
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

import torch
from torch import nn

from emakit.storage.sharded import full_shape, is_dtensor, local, local_readers

__all__ = [
    "BUFFER_POLICIES",
    "EVERYTHING",
    "Change",
    "Selection",
    "TrackedTensors",
    "describe_mismatch",
    "fill_tensors",
    "is_averaged",
    "is_dtensor",
    "local",
    "match_wrapped_names",
    "tracked_tensors",
    "unwrap",
    "weightless_copy",
]


def _is_deepspeed_engine(model: nn.Module) -> bool:
    engine = sys.modules.get("deepspeed.runtime.engine")  # loaded only where DeepSpeed is used
    return engine is not None and isinstance(model, engine.DeepSpeedEngine)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``, ``DistributedDataParallel`` and DeepSpeed engine wrappers.

    Their names differ from the wrapped module's only by an ``_orig_mod.`` or ``module.``
    prefix; averaging the wrapped module keeps the EMA's names those of the plain model.
    """
    while True:
        inner = model._modules.get("_orig_mod")  # a dict lookup: cheaper than Module.__getattr__ misses
        if inner is None and (isinstance(model, nn.parallel.DistributedDataParallel) or _is_deepspeed_engine(model)):
            inner = cast(nn.Module, model.module)  # the wrapped module (nn.Module.__getattr__ says a tensor or one)
        if inner is None:
            return model
        model = inner


def is_averaged(tensor: torch.Tensor) -> bool:
    """Whether an EMA averages ``tensor`` (floating point or complex) or copies it (integer, bool)."""
    return tensor.is_floating_point() or tensor.is_complex()


BUFFER_POLICIES = ("average", "copy", "ignore")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which of a model's tensors an EMA tracks, and whether floating-point buffers are averaged.

    ``include`` / ``exclude``: shell-style patterns (``fnmatch``: ``"encoder.*"``, ``"*.bias"``) matched
    against ``state_dict`` names; a tensor is tracked when it matches an ``include`` pattern (or
    ``include`` is None) and no ``exclude`` pattern. ``trainable_only``: parameters only where
    ``requires_grad`` (a frozen base of LoRA adapters is left out). ``buffers``: ``"average"``
    floating-point buffers, ``"copy"`` them like integer ones, or ``"ignore"`` every buffer.
    Untracked tensors are neither averaged, copied nor swapped: the model keeps its own.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    trainable_only: bool = False
    buffers: str = "average"

    @classmethod
    def of(
        cls,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        trainable_only: bool = False,
        buffers: str = "average",
    ) -> Selection:
        """A checked Selection; ValueError naming the bad argument and what is allowed."""

        def patterns(value: str | Iterable[str] | None, name: str) -> tuple[str, ...] | None:
            if value is None:
                return None
            values = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
            if not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{name}={value!r} must be a name pattern such as 'encoder.*' or a list of them")
            return values

        if not isinstance(trainable_only, bool):
            raise ValueError(f"trainable_only={trainable_only!r} must be True or False")
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers={buffers!r} must be one of {BUFFER_POLICIES}")
        return cls(patterns(include, "include"), patterns(exclude, "exclude") or (), trainable_only, buffers)

    def tracks(self, name: str, tensor: torch.Tensor, is_buffer: bool) -> bool:
        if is_buffer and self.buffers == "ignore":
            return False
        if self.trainable_only and not is_buffer and not tensor.requires_grad:
            return False
        if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def averages(self, tensor: torch.Tensor, is_buffer: bool) -> bool:
        """Whether a tracked tensor is averaged (else copied)."""
        return is_averaged(tensor) and not (is_buffer and self.buffers == "copy")


EVERYTHING = Selection()


def tracked_tensors(model: nn.Module, selection: Selection = EVERYTHING) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter and persistent buffer of ``model`` that ``selection`` keeps, once each.

    Example::

        >>> net = nn.BatchNorm1d(3)
        >>> [name for name, _ in tracked_tensors(net)]
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    seen: set[int] = set()
    buffers = (
        (f"{prefix}{'.' if prefix else ''}{key}", tensor)
        for prefix, module in model.named_modules()
        for key, tensor in module._buffers.items()
        if tensor is not None and key not in module._non_persistent_buffers_set
    )
    tagged = itertools.chain(((n, t, False) for n, t in model.named_parameters()), ((n, t, True) for n, t in buffers))
    for name, tensor, is_buffer in tagged:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            if selection is EVERYTHING or selection.tracks(name, tensor, is_buffer):
                yield name, tensor


class Change(enum.Enum):
    """What :meth:`TrackedTensors.check` found."""

    NONE = "none"  # the same tensor objects, at the same addresses
    MOVED = "moved"  # the same tensor objects and shapes, dtypes, devices; some ``.data`` now lives elsewhere
    STRUCTURE = "structure"  # a tensor replaced, added or removed, or one changed shape, dtype or device


_requires_grad = operator.attrgetter("requires_grad")


def _signature(tensor: torch.Tensor) -> tuple:
    data = local(tensor)
    return full_shape(tensor), data.shape, data.stride(), tensor.dtype, data.device


class TrackedTensors:
    """The tracked tensors of one model, by name, and a cheap check that they are still what the model holds.

    :meth:`check` compares, without a Python loop per tensor: the size of every parameter,
    buffer and submodule registry of the model; the object in every registry slot that holds a
    tracked tensor or a submodule; and each tracked tensor's data pointer and element count. A
    moved data pointer alone (``param.data = other`` of the same shape) is :attr:`Change.MOVED`.

    Example::

        >>> net = nn.Linear(2, 2)
        >>> tracked = TrackedTensors(net)
        >>> net.bias = nn.Parameter(torch.zeros(2))
        >>> tracked.check()
        <Change.STRUCTURE: 'structure'>
    """

    def __init__(self, model: nn.Module, selection: Selection = EVERYTHING) -> None:
        self._model = weakref.ref(model)  # weak: a cache keyed by a model may hold this
        self.named = dict(tracked_tensors(model, selection))
        # trainable_only: a parameter frozen or unfrozen later changes what is tracked
        self._parameters = list(model.parameters()) if selection.trainable_only else []
        self._trainable = list(map(_requires_grad, self._parameters))
        self.tensors = list(self.named.values())
        tracked_ids = {id(t) for t in self.tensors}
        self._registries: list[dict] = []
        slots: list[tuple[dict, str, object]] = []
        for module in model.modules():
            for registry in (module._parameters, module._buffers, module._modules):
                self._registries.append(registry)
                slots.extend(
                    (registry, key, v)
                    for key, v in registry.items()
                    if id(v) in tracked_ids or isinstance(v, nn.Module)
                )
        self._sizes = list(map(len, self._registries))
        self._slot_registries = [registry for registry, _, _ in slots]
        self._slot_keys = [key for _, key, _ in slots]
        self._slot_values = [value for _, _, value in slots]
        self._data_ptrs, self._local_numels = local_readers(self.tensors)  # this process's data, where sharded
        self._ptrs = self._data_ptrs()
        self._numels = self._local_numels()
        self._signatures = list(map(_signature, self.tensors))

    @property
    def model(self) -> nn.Module | None:
        """The model these tensors are of (None once it is gone)."""
        return self._model()

    def check(self) -> Change:
        """Whether the model still holds these tensors, where and as they were."""
        if list(map(len, self._registries)) != self._sizes:
            return Change.STRUCTURE
        current = map(dict.get, self._slot_registries, self._slot_keys)
        if not all(map(operator.is_, current, self._slot_values)):
            return Change.STRUCTURE
        if self._local_numels() != self._numels:
            return Change.STRUCTURE
        if self._parameters and list(map(_requires_grad, self._parameters)) != self._trainable:
            return Change.STRUCTURE
        ptrs = self._data_ptrs()
        if ptrs == self._ptrs:
            return Change.NONE
        if list(map(_signature, self.tensors)) != self._signatures:
            return Change.STRUCTURE
        return Change.MOVED

    def accept_moves(self) -> None:
        """Take the current data pointers as the expected ones (after a :attr:`Change.MOVED` was handled)."""
        self._ptrs = self._data_ptrs()


def describe_mismatch(
    expected: Mapping[str, torch.Tensor | torch.Size], actual: Mapping[str, torch.Tensor | torch.Size], what: str
) -> str | None:
    """The first difference of names or shapes between two maps of names to tensors (or shapes), or None."""
    for name, tensor in expected.items():
        if name not in actual:
            return f"{what} has no tensor {name!r}"
        found, wanted = getattr(actual[name], "shape", actual[name]), getattr(tensor, "shape", tensor)
        if found != wanted:
            return f"tensor {name!r} has shape {tuple(found)} in {what}, expected {tuple(wanted)}"
    for name in actual:
        if name not in expected:
            return f"{what} has an unexpected tensor {name!r}"
    return None


def _without_wrapper_prefixes(name: str) -> str:
    parts = [part for part in name.split(".") if part != "_orig_mod"]
    while parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def match_wrapped_names(state: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` keyed by ``names`` where its keys differ from them only by wrapper prefixes, else unchanged.

    ``torch.compile`` adds ``_orig_mod.`` and ``DistributedDataParallel`` adds ``module.`` to
    every name; a state saved from a wrapped model then loads into the plain one and back.

    Example::

        >>> w = torch.zeros(1)
        >>> list(match_wrapped_names({"module._orig_mod.fc.weight": w}, ["fc.weight"]))
        ['fc.weight']
    """
    names = list(names)
    if set(state) == set(names):
        return state
    wanted = {_without_wrapper_prefixes(name): name for name in names}
    renamed = {_without_wrapper_prefixes(key): tensor for key, tensor in state.items()}
    if len(wanted) != len(names) or len(renamed) != len(state) or set(wanted) != set(renamed):
        return state
    return {wanted[key]: tensor for key, tensor in renamed.items()}


def weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device: its structure, no weight memory.

    Taken before something makes the model uncopyable (FSDP2 refuses ``deepcopy``), it is
    filled later with :func:`fill_tensors`.
    """
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def fill_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` (by tracked name) into ``model`` in place of its own, wherever each is shared; returns it."""
    slots: dict[int, list[tuple[dict, str]]] = {}
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for attr, tensor in registry.items():
                if tensor is not None:
                    slots.setdefault(id(tensor), []).append((registry, attr))
    named = dict(tracked_tensors(model))
    for name, value in tensors.items():
        old = named[name]
        new = nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value
        for table, attr in slots[id(old)]:
            table[attr] = new
    return model
