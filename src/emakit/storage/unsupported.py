"""The tensors emakit refuses to average: those whose data it cannot find, named with the engine that made them.

An engine that shards weights often leaves an empty placeholder where a parameter was (``numel() == 0``) and keeps
the data elsewhere. Averaging the placeholder averages nothing, silently; so at layout (the first update) every
tracked tensor must be one emakit understands (:mod:`emakit.storage.sharded`), else :class:`UnsupportedTensorError`
names it, its engine, and what is supported:

- FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) tensors emakit cannot average now
  (:func:`emakit.storage.fsdp1.refusal`): a unit unsharded (inside FSDP's forward pass or ``summon_full_params``), a
  view whose size is not what FSDP's metadata says this rank holds, a model given without its FSDP root. Their
  handles are found first (:func:`emakit.storage.fsdp1.register`): an empty view is legitimately empty where FSDP's
  metadata says the parameter lies in other ranks' shards.
- DTensors on a device mesh of more than one dimension (HSDP, tensor parallelism) or placed other than
  ``Shard(dim)`` / ``Replicate()`` (``Partial``, strided shards).
- DeepSpeed ZeRO-3 parameters whose partition is not where the forward pass gathers it from, or not in memory
  (:func:`emakit.storage.zero.refusal`: NVMe offload, hpZ secondary partitions, MiCS and other subgroups).
- Any other empty parameter or buffer whose entry in the model's ``state_dict()`` is larger: some engine keeps
  its data elsewhere.

Example::

    >>> net = nn.Linear(2, 2)
    >>> refuse_unsupported(net, dict(net.named_parameters()))  # a plain model: nothing to refuse
"""

from __future__ import annotations

import torch
from torch import nn

from emakit.storage import fsdp1, zero
from emakit.storage.sharded import is_dtensor, is_sharded

__all__ = ["UnsupportedTensorError", "refuse_unsupported"]


class UnsupportedTensorError(ValueError):
    """A tracked tensor whose data emakit cannot find or does not understand (an engine's placeholder)."""


def refuse_unsupported(model: nn.Module, named: dict[str, torch.Tensor]) -> None:
    """Raise :class:`UnsupportedTensorError` for the first tracked tensor of ``model`` emakit does not understand.

    ``named``: the tracked tensors by name. Cheap for plain models: a few attribute checks per tensor; the model's
    ``state_dict()`` is read only when an empty floating-point tensor is tracked.
    """
    units = fsdp1.register(model)  # the FSDP1 units' handles: where each FSDP1 tensor's shard lies
    unsharded = fsdp1.unsharded_refusal(units)
    if unsharded:
        raise UnsupportedTensorError(unsharded)
    empty = []
    for name, tensor in named.items():
        reason = (
            (fsdp1.refusal(tensor, units) if fsdp1.is_fsdp1(tensor) else None) or _dtensor(tensor) or _deepspeed(tensor)
        )
        if reason:
            raise UnsupportedTensorError(f"{name!r} {reason}")
        if tensor.numel() == 0 and (tensor.is_floating_point() or tensor.is_complex()) and not is_sharded(tensor):
            empty.append(name)
    if empty:
        _refuse_placeholders(model, named, empty)


def _dtensor(tensor: torch.Tensor) -> str | None:
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim == 1 and all(type(p) in (Shard, Replicate) for p in placements):
        return None
    return (
        f"is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} placed {placements}: emakit averages "
        "DTensors on a 1-D mesh placed Shard(dim) or Replicate() (FSDP2's fully_shard on a 1-D mesh), not 2-D "
        "meshes (HSDP, tensor parallelism) or Partial and strided placements"
    )


def _deepspeed(tensor: torch.Tensor) -> str | None:
    return zero.refusal(tensor) if zero.is_zero3(tensor) else None


def _refuse_placeholders(model: nn.Module, named: dict[str, torch.Tensor], empty: list[str]) -> None:
    """Empty tracked tensors are refused where the model's ``state_dict()`` holds more for them."""
    by_id = {id(named[name]): name for name in empty}
    keys = {name: name for name in empty}  # a tensor's tracked name is its state_dict key, and tied copies' keys:
    keys.update((key, by_id[id(t)]) for key, t in model.state_dict(keep_vars=True).items() if id(t) in by_id)
    state = model.state_dict()  # without keep_vars: what an engine's hooks make of its placeholders
    for key, name in keys.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        numel = value.numel()
        if numel > 0:
            raise UnsupportedTensorError(
                f"{name!r} is an empty placeholder (numel 0, shape {tuple(named[name].shape)}) while the model's "
                f"state_dict() holds {numel} elements for it ({key!r}, shape {tuple(value.shape)}): some engine keeps "
                "its data elsewhere, and averaging the placeholder would average nothing. emakit averages plain "
                "tensors, FSDP2 DTensor shards (torch.distributed.fsdp.fully_shard) and DeepSpeed ZeRO partitions"
            )
