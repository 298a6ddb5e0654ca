"""This process's data of a tracked tensor, in whichever engine sharded it: the one place that knows where a shard is.

The rule: **the average lives where the weights' shards live**. Each rank averages the data it holds of each
tensor, with no communication per update; a swap writes that data (the engine gathers it for the forward pass);
only exports gather, to rank 0, one tensor at a time. Every storage mode, the layout, the state and the exports
reach a tensor's data through the functions here, whatever the engine:

=====================  ==========================  ===============================  ==============================
tensor                 :func:`local`: a swap        :func:`source`: the average      :func:`gathered`: the full
                       writes it                    follows it                       tensor, for exports
=====================  ==========================  ===============================  ==============================
plain tensor           the tensor                   the tensor                       a copy, on every rank
FSDP2 ``DTensor``      its local shard              its local shard                  ``full_tensor()``, every rank
DeepSpeed ZeRO-3       ``p.ds_tensor[:k_r]``        the fp32 master partition        gathered to rank 0 only
parameter              (:mod:`~.zero`)             (``ds_tensor`` if frozen)        (``dist.gather``, padded)
FSDP1 FlatParameter    its shard, padding left      the same                         each original parameter
or original parameter  out; a view: itself                                           gathered to rank 0 only
(:mod:`~.fsdp1`)       (``use_orig_params=True``)                                    (:func:`exported`)
=====================  ==========================  ===============================  ==============================

DeepSpeed ZeRO-1/2 parameters are whole: plain tensors here, except that a copy of the average into the model
writes the optimizer's fp32 master fragments too (:func:`write_masters`), as it writes ZeRO-3's master partitions.

A state (``state_dict``) holds each rank's data as :func:`present` shows it: a DTensor with the parameter's mesh
and placements (``torch.distributed.checkpoint`` reshards it), ZeRO-3 partitions and FSDP1 flat shards as plain
1-D tensors with :func:`partitioning` saying whose they are (they resume on the same world size only). An export
names full tensors as the unwrapped model's ``state_dict`` does (:func:`state_dict_keys`, :func:`exported`): an
FSDP1 FlatParameter's average stands for several. Nothing here imports an engine: a DTensor, a ZeRO-3 or an FSDP1
parameter exists only once its engine is imported. Tensors no engine here understands are refused by
:mod:`emakit.storage.unsupported`.

Example::

    >>> w = torch.ones(3)
    >>> local(w) is w, source(w) is w, is_sharded(w)
    (True, True, False)
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from emakit.storage import fsdp1, zero

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "after_write",
    "before_write",
    "check_partitioning",
    "export_names",
    "exported",
    "full_shape",
    "gathered",
    "has_master_apart",
    "is_dtensor",
    "is_sharded",
    "local",
    "local_data_ptr",
    "local_numel",
    "local_readers",
    "localized",
    "partitioning",
    "present",
    "source",
    "state_dict_keys",
    "state_shape",
    "write_masters",
]


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (an FSDP2 shard), without importing DTensor support.

    ``torch.distributed.tensor`` costs about half a second to import (it pulls in sympy); a DTensor
    exists only once it is imported, so until then nothing is one.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether this process's data of ``tensor`` is somewhere other than ``tensor`` itself (a shard, a partition)."""
    return is_dtensor(tensor) or zero.is_zero3(tensor) or fsdp1.is_fsdp1(tensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's data of ``tensor``, as the engine's forward pass reads it: the local shard of a DTensor, the
    partition of a ZeRO-3 parameter or the shard of an FSDP1 FlatParameter (padding left out), else the tensor
    itself (an FSDP1 original parameter is a view of its slice of the shard). A swap writes it."""
    if is_dtensor(tensor):
        return tensor._local_tensor
    if zero.is_zero3(tensor):
        return zero.partition(tensor)
    if fsdp1.is_flat(tensor):
        return fsdp1.local(tensor)
    return tensor


def source(tensor: torch.Tensor) -> torch.Tensor:
    """The data the average of ``tensor`` follows: ZeRO-3's fp32 master partition where the optimizer keeps one
    (what it steps), else :func:`local`. Same shape as :func:`local`."""
    return zero.master(tensor) if zero.is_zero3(tensor) else local(tensor)


def local_data_ptr(tensor: torch.Tensor) -> int:
    """Where :func:`local` starts (cheaply: no view is made)."""
    if is_dtensor(tensor):
        return tensor._local_tensor.data_ptr()
    if zero.is_zero3(tensor):
        return tensor.ds_tensor.data_ptr()
    return tensor.data_ptr()


def local_numel(tensor: torch.Tensor) -> int:
    """How many elements :func:`local` has."""
    if is_dtensor(tensor):
        return tensor._local_tensor.numel()
    if zero.is_zero3(tensor):
        return zero.real_numel(tensor)
    return fsdp1.local_numel(tensor)


def local_readers(tensors: Sequence[torch.Tensor]) -> tuple[Callable[[], list[int]], Callable[[], list[int]]]:
    """Two functions giving :func:`local_data_ptr` and :func:`local_numel` of each of ``tensors``, in one fixed order
    (DTensors first): for a per-update check that compares them with earlier readings.

    Which engine holds each tensor is looked up once, here: a DTensor's local shard is then read by C-level maps,
    without a Python call per tensor (FSDP2 models of thousands of small tensors spent more time asking each tensor
    what it is than averaging it). The tensors must stay the objects they are (their registration is checked apart).
    """
    dtensors = [t for t in tensors if is_dtensor(t)]
    others = [t for t in tensors if not is_dtensor(t)]
    local_shard = operator.attrgetter("_local_tensor")
    if not dtensors:
        pointer, count = (
            (local_data_ptr, local_numel)
            if any(map(is_sharded, others))
            else (torch.Tensor.data_ptr, torch.Tensor.numel)
        )
        return (lambda: list(map(pointer, others))), (lambda: list(map(count, others)))

    def pointers() -> list[int]:
        return [*map(torch.Tensor.data_ptr, map(local_shard, dtensors)), *map(local_data_ptr, others)]

    def numels() -> list[int]:
        return [*map(torch.Tensor.numel, map(local_shard, dtensors)), *map(local_numel, others)]

    return pointers, numels


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a ZeRO-3 parameter's ``ds_shape``; its own shape is ``(0,)`` outside forward)."""
    return tensor.ds_shape if zero.is_zero3(tensor) else tensor.shape


def state_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape a state holds for ``tensor`` (:func:`present`): the partition's for ZeRO-3, the shard's for an FSDP1
    FlatParameter, else the tensor's (an FSDP1 original parameter's 1-D slice; a DTensor's global shape)."""
    if zero.is_zero3(tensor) or fsdp1.is_flat(tensor):
        return torch.Size([local_numel(tensor)])
    return tensor.shape


def present(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (this process's data of an average of ``tensor``) as a state holds it: a DTensor with ``tensor``'s
    mesh and placements (``shape``/``stride`` given: unevenly padded shards need them), else ``value`` itself."""
    return _dtensor_like(tensor, value) if is_dtensor(tensor) else value


def _dtensor_like(tensor: DTensor, value: torch.Tensor) -> DTensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
    )


def localized(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (an average of ``tensor``, from a state or an earlier layout) as this process holds it for
    ``tensor``, where ``value`` is whole and ``tensor`` sharded: for a DTensor, a DTensor with its mesh and placements
    (each rank keeping its own part); for a ZeRO-3 parameter, this rank's partition of it, as a state holds it. No
    communication: every rank has the whole ``value``. Anything else is ``value`` itself.

    So an average of the unsharded model (from a state of whole tensors: a full checkpoint, an export, a run on
    other ranks; or laid out before ``fully_shard``) carries on, shard by shard, once the model is sharded.

    Example::

        >>> localized(torch.ones(3), torch.zeros(3))   # plain tensors: the value itself
        tensor([0., 0., 0.])
    """
    if is_dtensor(tensor) and not is_dtensor(value) and value.shape == tensor.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.detach(), tensor.device_mesh, tensor.placements, src_data_rank=None)
    if zero.is_zero3(tensor) and value.shape == tensor.ds_shape and value.shape != state_shape(tensor):
        return zero.part_of_whole(tensor, value)
    return value


def gathered(tensor: torch.Tensor, value: torch.Tensor, copy: bool = True) -> torch.Tensor | None:
    """The full average of ``tensor`` whose local data is ``value``, where this rank receives it: every rank for a
    DTensor (``full_tensor()``), rank 0 for ZeRO-3 and an FSDP1 original parameter (None elsewhere), ``value`` for a
    plain tensor (a copy unless ``copy=False``). Gathered tensors are fresh. Collective for sharded tensors: every
    rank calls, in one order. An FSDP1 FlatParameter stands for several tensors: :func:`exported`."""
    if is_dtensor(tensor):
        return _dtensor_like(tensor, value).full_tensor()
    if zero.is_zero3(tensor):
        return zero.gather_to_main(tensor, value)
    if fsdp1.is_fsdp1(tensor):
        return fsdp1.gathered(tensor, value, copy)
    return value.detach().clone() if copy else value


def export_names(name: str, tensor: torch.Tensor) -> list[str]:
    """The names of the full tensors the average of tracked tensor ``name`` stands for: ``[name]``, except for an
    FSDP1 FlatParameter (its original parameters', ``prefix._flat_param`` -> ``prefix.<fqn>``).

    Example::

        >>> export_names("fc.weight", torch.ones(2))
        ['fc.weight']
    """
    return fsdp1.export_names(name, tensor) if fsdp1.is_flat(tensor) else [name]


def exported(name: str, tensor: torch.Tensor, value: torch.Tensor, copy: bool = True) -> Iterator[tuple[str, Any]]:
    """``(export name, full average)`` of each tensor the average ``value`` of tracked tensor ``name`` stands for
    (:func:`export_names`), where this rank receives it (None elsewhere): :func:`gathered`, one tensor at a time.
    Collective for sharded tensors: every rank calls, in one order."""
    if fsdp1.is_fsdp1(tensor):
        yield from fsdp1.exported(name, tensor, value, copy)
    else:
        yield name, gathered(tensor, value, copy)


def state_dict_keys(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, str]:
    """The key of each full tensor of ``model`` in the unwrapped model's ``state_dict`` -> its export name
    (:func:`export_names` of the tracked tensors ``named``), tied tensors under each of their names.

    From ``model.state_dict(keep_vars=True)``, except for a model FSDP1 wrapped: its ``state_dict()`` would gather
    the whole model, so FSDP's metadata names its tensors (wrapper prefixes left out).
    """
    if any(map(fsdp1.is_fsdp1, named.values())):
        return fsdp1.state_dict_keys(model, named)
    name_of = {id(t): name for name, t in named.items()}
    return {key: name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in name_of}


def has_master_apart(tensor: torch.Tensor) -> bool:
    """Whether an optimizer keeps a master copy of ``tensor`` apart from both :func:`local` and :func:`source`."""
    return zero.has_master_apart(tensor)


def before_write(tensors: list[torch.Tensor]) -> None:
    """Before this process's data of ``tensors`` is written (a swap, a copy into the model): refuse where the write
    would be lost (ValueError): FSDP1 units unsharded now (inside a forward pass or ``summon_full_params``)."""
    fsdp1.check_sharded([t for t in tensors if fsdp1.is_fsdp1(t)])


def after_write(tensors: Iterable[torch.Tensor]) -> None:
    """After this process's data of ``tensors`` was written (a swap, a copy into the model): make the engine see it.
    ZeRO-3 keeps some parameters whole (persistent ones): they are gathered anew (collective). FSDP1 keeps some units
    unsharded after a forward pass: those copies are freed (:func:`emakit.storage.fsdp1.after_write`; local). Others:
    nothing."""
    tensors = list(tensors)
    whole = [t for t in tensors if zero.is_zero3(t)]
    if whole:
        zero.regather(whole)
    flat = [t for t in tensors if fsdp1.is_fsdp1(t)]
    if flat:
        fsdp1.after_write(flat)


def write_masters(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """After a copy of ``values`` (whole averages) into ``tensors``: write them into the master copies an optimizer
    keeps apart from the parameters and steps (DeepSpeed ZeRO-1/2's fp32 fragments), else its next step would undo
    the copy. ZeRO-3's masters are the sources, written as such; plain optimizers step the parameters themselves."""
    for tensor, value in zip(tensors, values):
        if zero.has_master_apart(tensor):
            zero.write_master(tensor, value)


def partitioning(tensors: Iterable[torch.Tensor]) -> dict | None:
    """Whose data a state of ``tensors`` holds, where it can be loaded only by the same rank of the same world:
    ``{"engine": "deepspeed-zero3", "rank": r, "world_size": n}`` for ZeRO-3 partitions, ``{"engine": "fsdp1", ...}``
    for FSDP1 flat shards (:func:`emakit.storage.fsdp1.layout`), else None."""
    for tensor in tensors:
        if zero.is_zero3(tensor):
            rank, world = zero.layout(tensor)
            return {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}
        if fsdp1.is_fsdp1(tensor):
            return fsdp1.layout(tensor)
    return None


def check_partitioning(saved: dict | None, here: dict | None) -> None:
    """Refuse a state holding other ranks' data (ZeRO-3 partitions, FSDP1 flat shards, ``shard_over_ranks`` slices of
    another world size or rank), naming both. A state of whole tensors loads into ZeRO-3 partitions (each rank keeps
    its part: :func:`localized`), not into FSDP1 flat shards or ``shard_over_ranks`` slices.

    Example::

        >>> check_partitioning(None, None)   # whole tensors on both sides: fine
    """
    if saved == here or (saved is None and (here or {}).get("engine") == "deepspeed-zero3"):
        return

    def described(layout: dict | None, whose: str) -> str:
        if not layout:
            return f"{whose} whole tensors (no ZeRO-3 partitions, FSDP1 flat shards or shard_over_ranks slices)"
        engine = str(layout.get("engine"))
        what = _PIECES.get(engine, f"the {engine} shards")
        where = f"rank {layout.get('rank')} of {layout.get('world_size')}"
        if engine == "shard_over_ranks":
            return f"{whose} {what} of {where} ({layout.get('total')} elements split)"
        return f"{whose} {what} of {where}"

    raise ValueError(
        f"{described(saved, 'the EMA state holds')}, but {described(here, 'this model has')}: an average of ZeRO-3 "
        "partitions, FSDP1 flat shards or shard_over_ranks slices resumes on the same world size, each rank loading "
        "the state it saved (its own part). To move an average to another world size, export it "
        "(ema.save_ema_weights(path) on every rank of the old run) and load that file into a plain model; a ZeRO-3 "
        "average can also be saved whole (ema.state_dict(whole=True) on every rank: rank 0 gets it) and loaded into "
        "the new run's EMA"
    )


_PIECES = {
    "deepspeed-zero3": "the DeepSpeed ZeRO-3 partitions",
    "fsdp1": "the FSDP1 flat shards",
    "shard_over_ranks": "the shard_over_ranks slices",
}
