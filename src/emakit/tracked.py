"""Which tensors of a model an EMA tracks, by name, and a cheap signal that a model's structure changed.

An EMA averages every floating-point parameter and buffer and copies every other buffer
(BatchNorm's ``num_batches_tracked``). Tensors are named as in ``model.state_dict()``; a
tensor shared by several modules (tied weights) is tracked once, under its first name.

Python-level walks over a model cost more than averaging a model of many small tensors, so
callers cache what they find here and re-walk only when :func:`structure_generation`
changes: it counts every parameter, buffer and submodule registration in the process (a
replaced ``Parameter``, ``load_state_dict(assign=True)``, a new layer).
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "describe_mismatch",
    "fill_tensors",
    "is_averaged",
    "match_wrapped_names",
    "remember_skeleton",
    "skeleton_of",
    "structure_generation",
    "tracked_tensors",
    "unwrap",
]

_generation = itertools.count()
_current_generation = next(_generation)


def _on_registration(registry: str) -> Callable[[nn.Module, str, object], None]:
    def hook(module: nn.Module, name: str, value: object) -> None:
        global _current_generation
        if module.__dict__.get(registry, {}).get(name) is not value:  # `self.buf += 1` re-registers the same tensor
            _current_generation = next(_generation)

    return hook


nn.modules.module.register_module_parameter_registration_hook(_on_registration("_parameters"))
nn.modules.module.register_module_buffer_registration_hook(_on_registration("_buffers"))
nn.modules.module.register_module_module_registration_hook(_on_registration("_modules"))


def structure_generation() -> int:
    """A number that changes whenever any module in the process registers a new parameter, buffer or submodule."""
    return _current_generation


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` and ``DistributedDataParallel`` wrappers.

    Their names differ from the wrapped module's only by an ``_orig_mod.`` or ``module.``
    prefix; averaging the wrapped module keeps the EMA's names those of the plain model.
    """
    while True:
        inner = model._modules.get("_orig_mod")  # a dict lookup: cheaper than Module.__getattr__ misses
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def is_averaged(tensor: torch.Tensor) -> bool:
    """Whether an EMA averages ``tensor`` (floating point or complex) or copies it (integer, bool)."""
    return tensor.is_floating_point() or tensor.is_complex()


def tracked_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter and buffer of ``model``, each tensor once.

    Example::

        >>> net = nn.BatchNorm1d(3)
        >>> [name for name, _ in tracked_tensors(net)]
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    seen: set[int] = set()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def describe_mismatch(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> str | None:
    """The first difference of names or shapes between two name->tensor maps, or None when they match."""
    for name, tensor in expected.items():
        if name not in actual:
            return f"{what} has no tensor {name!r}"
        if actual[name].shape != tensor.shape:
            return f"tensor {name!r} has shape {tuple(actual[name].shape)} in {what}, expected {tuple(tensor.shape)}"
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


_skeletons: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def remember_skeleton(model: nn.Module) -> None:
    """Keep a weightless copy of ``model`` (its tensors on the meta device), for :func:`skeleton_of`.

    Taken before something makes the model uncopyable (FSDP2 refuses ``deepcopy``); costs no weight memory.
    """
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    _skeletons[model] = copy.deepcopy(model, memo)


def skeleton_of(model: nn.Module) -> nn.Module | None:
    """A fresh weightless copy of ``model`` remembered by :func:`remember_skeleton`, or None."""
    remembered = _skeletons.get(model)
    return None if remembered is None else copy.deepcopy(remembered)


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
        for registry, attr in slots[id(old)]:
            registry[attr] = new
    return model
