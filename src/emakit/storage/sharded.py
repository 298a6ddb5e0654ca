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
=====================  ==========================  ===============================  ==============================

DeepSpeed ZeRO-1/2 parameters are whole: plain tensors here, except that a copy of the average into the model
writes the optimizer's fp32 master fragments too (:func:`write_masters`), as it writes ZeRO-3's master partitions.

A state (``state_dict``) holds each rank's data as :func:`present` shows it: a DTensor with the parameter's mesh
and placements (``torch.distributed.checkpoint`` reshards it), ZeRO-3 partitions as plain 1-D tensors with
:func:`partitioning` saying whose they are (they resume on the same world size only). Nothing here imports an
engine: a DTensor or a ZeRO-3 parameter exists only once its engine is imported. Tensors no engine here
understands are refused by :mod:`emakit.storage.unsupported`.

Example::

    >>> w = torch.ones(3)
    >>> local(w) is w, source(w) is w, is_sharded(w)
    (True, True, False)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeGuard

import torch

from emakit.storage import zero

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "after_write",
    "check_partitioning",
    "full_shape",
    "gathered",
    "has_master_apart",
    "is_dtensor",
    "is_sharded",
    "local",
    "local_data_ptr",
    "local_numel",
    "partitioning",
    "present",
    "source",
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
    return is_dtensor(tensor) or zero.is_zero3(tensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's data of ``tensor``, as the engine's forward pass reads it: the local shard of a DTensor, the
    partition of a ZeRO-3 parameter (padding left out), else the tensor itself. A swap writes it."""
    if is_dtensor(tensor):
        return tensor._local_tensor
    if zero.is_zero3(tensor):
        return zero.partition(tensor)
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
    return tensor.numel()


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a ZeRO-3 parameter's ``ds_shape``; its own shape is ``(0,)`` outside forward)."""
    return tensor.ds_shape if zero.is_zero3(tensor) else tensor.shape


def state_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape a state holds for ``tensor`` (:func:`present`): the partition's for ZeRO-3, else the full shape."""
    return torch.Size([zero.real_numel(tensor)]) if zero.is_zero3(tensor) else tensor.shape


def present(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (this process's data of an average of ``tensor``) as a state holds it: a DTensor with ``tensor``'s
    mesh and placements (``shape``/``stride`` given: unevenly padded shards need them), else ``value`` itself."""
    return _dtensor_like(tensor, value) if is_dtensor(tensor) else value


def _dtensor_like(tensor: DTensor, value: torch.Tensor) -> DTensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
    )


def gathered(tensor: torch.Tensor, value: torch.Tensor, copy: bool = True) -> torch.Tensor | None:
    """The full average of ``tensor`` whose local data is ``value``, where this rank receives it: every rank for a
    DTensor (``full_tensor()``), rank 0 for ZeRO-3 (None elsewhere), ``value`` for a plain tensor (a copy unless
    ``copy=False``). Gathered tensors are fresh. Collective for sharded tensors: every rank calls, in one order."""
    if is_dtensor(tensor):
        return _dtensor_like(tensor, value).full_tensor()
    if zero.is_zero3(tensor):
        return zero.gather_to_main(tensor, value)
    return value.detach().clone() if copy else value


def has_master_apart(tensor: torch.Tensor) -> bool:
    """Whether an optimizer keeps a master copy of ``tensor`` apart from both :func:`local` and :func:`source`."""
    return zero.has_master_apart(tensor)


def after_write(tensors: Iterable[torch.Tensor]) -> None:
    """After this process's data of ``tensors`` was written (a swap, a copy into the model): make the engine see it.
    ZeRO-3 keeps some parameters whole (persistent ones): they are gathered anew (collective). Others: nothing."""
    whole = [t for t in tensors if zero.is_zero3(t)]
    if whole:
        zero.regather(whole)


def write_masters(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """After a copy of ``values`` (whole averages) into ``tensors``: write them into the master copies an optimizer
    keeps apart from the parameters and steps (DeepSpeed ZeRO-1/2's fp32 fragments), else its next step would undo
    the copy. ZeRO-3's masters are the sources, written as such; plain optimizers step the parameters themselves."""
    for tensor, value in zip(tensors, values):
        if zero.has_master_apart(tensor):
            zero.write_master(tensor, value)


def partitioning(tensors: Iterable[torch.Tensor]) -> dict | None:
    """Whose data a state of ``tensors`` holds, where it can be loaded only by the same rank of the same world:
    ``{"engine": "deepspeed-zero3", "rank": r, "world_size": n}`` for ZeRO-3 partitions, else None."""
    for tensor in tensors:
        if zero.is_zero3(tensor):
            rank, world = zero.layout(tensor)
            return {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}
    return None


def check_partitioning(saved: dict | None, here: dict | None) -> None:
    """Refuse a state holding other ranks' data (ZeRO-3 partitions, ``shard_over_ranks`` slices of another world size
    or rank) or none where this rank's are expected, naming both.

    Example::

        >>> check_partitioning(None, None)   # whole tensors on both sides: fine
    """
    if saved == here:
        return

    def described(layout: dict | None, whose: str) -> str:
        if not layout:
            return f"{whose} whole tensors (no ZeRO-3 partitions, no shard_over_ranks slices)"
        where = f"rank {layout.get('rank')} of {layout.get('world_size')}"
        if layout.get("engine") == "shard_over_ranks":
            return f"{whose} the shard_over_ranks slices of {where} ({layout.get('total')} elements split)"
        return f"{whose} the DeepSpeed ZeRO-3 partitions of {where}"

    raise ValueError(
        f"{described(saved, 'the EMA state holds')}, but {described(here, 'this model has')}: a ZeRO-3 or "
        "shard_over_ranks average resumes on the same world size, each rank loading the state it saved (its own "
        "partitions or slice). To move an average to another world size, export it (ema.save_ema_weights(path) on "
        "every rank of the old run) and load that file into a plain model"
    )
