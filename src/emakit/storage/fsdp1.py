"""torch FSDP1 (``FullyShardedDataParallel``): where a parameter's data lives on this rank, and how a full tensor
reaches rank 0.

FSDP1 flattens the parameters of each wrapped unit into one ``FlatParameter`` and keeps ``S`` elements of it on each
of the ``n`` ranks of its process group: rank ``r`` holds elements ``[r * S, (r + 1) * S)`` of the unsharded flat
parameter (the last ranks' ends are padding, ``_shard_numel_padded`` of them). Outside forward the data is there:

- ``use_orig_params=False``: the module holds the ``FlatParameter`` (named ``..._flat_param``), ``S`` elements long.
  Its average is ``flat[:S - padded]``: padding is never averaged, saved or exported.
- ``use_orig_params=True``: the modules hold their original parameters, each a 1-D view of this rank's slice of
  it in the flat shard: ``flat[offset_in_shard : offset_in_shard + numel_in_shard]`` (``_shard_param_infos``), or
  an empty tensor on a rank that holds none of it. An empty view is legitimately empty exactly where FSDP's
  metadata says the parameter is not in this rank's shard; anything else is a placeholder and refused.

Both are averaged where they are (an update reads them, a swap writes them: FSDP's next forward pass gathers
them). An original parameter of ``m`` elements starting at ``a`` in the unsharded flat parameter has, on rank ``k``,
the slice ``[max(a, kS), min(a + m, (k + 1)S))`` of the flat parameter, i.e. elements ``max(a, kS) - a ...`` of the
flattened parameter; :func:`exported` gathers each rank's slice to rank 0 of the group, one original parameter at
a time (``dist.gather`` of at most ``min(m, S)`` elements per rank), and rank 0 reassembles it in its full shape.
Rank 0 holds at most ``n * min(m, S)`` extra elements at once: memory stays bounded by one parameter, unlike
FSDP's ``FULL_STATE_DICT``, which unshards a whole unit.

FSDP's metadata lives on its ``FlatParamHandle``; the flat and original parameters do not point to it, so
:func:`register` finds the handles of a model's ``FullyShardedDataParallel`` modules (call it with the model the
EMA follows: the root wrapper). Sharding strategies: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` and
``_HYBRID_SHARD_ZERO2`` (sharded within the handle's group, the same shard on each replica), ``NO_SHARD`` (the
whole flat parameter on every rank). Parameter mixed precision and CPU offload keep the full-precision shard in
``_local_shard``, which is what the optimizer steps and what is averaged. While FSDP has a unit unsharded (inside
its forward or backward pass, or ``FSDP.summon_full_params``) the module holds other tensors: an EMA touching
them then is refused (:func:`refusal`, :func:`check_sharded`).

Nothing here imports torch's FSDP: an FSDP1 tensor exists only once FSDP made it.

Example (on every rank, ``model = FullyShardedDataParallel(net, device_id=torch.device("cpu"))``)::

    >>> register(model)
    >>> flat = next(model.parameters())        # use_orig_params=False
    >>> local(flat).shape                      # this rank's elements, padding left out
    torch.Size([544])
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from torch.distributed.fsdp._flat_param import FlatParameter, FlatParamHandle

__all__ = [
    "after_write",
    "check_sharded",
    "clean_name",
    "export_names",
    "exported",
    "gathered",
    "is_flat",
    "is_fsdp1",
    "layout",
    "local",
    "local_numel",
    "refusal",
    "register",
    "state_dict_keys",
    "unsharded_refusal",
]

FSDP2_WAY = (
    "or shard the model with FSDP2 (torch.distributed.fsdp.fully_shard on a 1-D device mesh), whose DTensor shards "
    "emakit averages in place"
)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_SHARDED_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


class _Where(NamedTuple):
    """Which handle an FSDP1 tensor belongs to, and which original parameter it is (None: the FlatParameter)."""

    handle: weakref.ref[FlatParamHandle]
    param: int | None


# FSDP1 tensor (by identity) -> its handle and index; weak both ways (a handle holds its tensors: a strong value
# would keep them alive)
_where: WeakIdKeyDictionary = WeakIdKeyDictionary()


def is_fsdp1(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP1 FlatParameter or an original parameter viewing one (``use_orig_params=True``)."""
    return getattr(tensor, "_fsdp_flattened", False) is True


def is_flat(tensor: torch.Tensor) -> TypeGuard[FlatParameter]:
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` (``use_orig_params=False``)."""
    return getattr(tensor, "_is_flat_param", False) is True


def register(model: nn.Module) -> list[FlatParamHandle]:
    """Note the handle of every FSDP1 unit in ``model`` (a ``FullyShardedDataParallel`` module), so that its flat and
    original parameters can be found, checked and gathered; returns them. Cheap: nothing happens unless FSDP is
    imported."""
    module = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    handles: list[FlatParamHandle] = []
    if module is None:
        return handles
    for unit in model.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, module.FullyShardedDataParallel) else None
        if handle is None:  # a unit without parameters of its own
            continue
        flat, ref = handle.flat_param, weakref.ref(handle)
        _where[flat] = _Where(ref, None)
        for index, param in enumerate(flat._params or ()):  # use_orig_params=True; tied ones are the same objects
            _where[param] = _Where(ref, index)
        handles.append(handle)
    return handles


def unsharded_refusal(handles: list[FlatParamHandle]) -> str | None:
    """Why an EMA cannot use a model whose FSDP1 units are ``handles`` now (one is unsharded), or None. Inside
    ``summon_full_params`` with ``use_orig_params=False`` the module holds the original parameters, not the
    FlatParameters: only the handles tell."""
    for handle in handles:
        if _is_unsharded_now(handle):
            return f"the FSDP1 unit of {list(handle.flat_param._fqns)[:4]} is one {_UNSHARDED}"
    return None


def _handle(tensor: torch.Tensor) -> tuple[FlatParamHandle, int | None] | None:
    where = _where.get(tensor)
    handle = where.handle() if where is not None else None
    return None if handle is None or where is None else (handle, where.param)


def _strategy(handle: FlatParamHandle) -> str:
    return handle._sharding_strategy.name


def _is_unsharded_now(handle: FlatParamHandle) -> bool:
    """Whether FSDP has the unit's flat parameter unsharded (forward, backward, ``summon_full_params``)."""
    flat = handle.flat_param
    shard = getattr(flat, "_local_shard", None)  # set at FSDP's lazy init (its first forward): until then, flat is
    return handle.uses_sharded_strategy and shard is not None and flat.data_ptr() != shard.data_ptr()


def _in_shard(handle: FlatParamHandle, index: int) -> int:
    """How many elements of original parameter ``index`` this rank's shard holds."""
    info = handle.flat_param._shard_param_infos[index]
    return (info.numel_in_shard or 0) if info.in_shard else 0


def refusal(tensor: torch.Tensor, handles: list[FlatParamHandle]) -> str | None:
    """Why emakit cannot average FSDP1 tensor ``tensor`` of a model whose units are ``handles`` (:func:`register`)
    now, or None when it can."""
    what = "an FSDP1 FlatParameter" if is_flat(tensor) else "a view into an FSDP1 FlatParameter (use_orig_params=True)"
    where = f"is {what} (torch.distributed.fsdp.FullyShardedDataParallel, shape {tuple(tensor.shape)} on this rank)"
    found = _handle(tensor)
    if found is None or not any(found[0] is handle for handle in handles):
        return (
            f"{where} whose FullyShardedDataParallel module is not in the model given to the EMA: pass the FSDP-"
            "wrapped model itself (the root FullyShardedDataParallel module), not its .module or a submodule"
        )
    handle, index = found
    strategy = _strategy(handle)
    if strategy not in (*_SHARDED_STRATEGIES, "NO_SHARD"):
        return f"{where} sharded as {strategy}, which emakit does not know; {_SUPPORTED}"
    if _is_unsharded_now(handle):
        return f"{where} {_UNSHARDED}"
    if index is not None:
        expected = _in_shard(handle, index) if handle.uses_sharded_strategy else handle.flat_param._numels[index]
        if tensor.numel() != expected:
            return (
                f"{where} holding {tensor.numel()} elements where FSDP's metadata says this rank holds {expected} "
                f"of it ({handle.flat_param._fqns[index]!r}): emakit does not know where its data is; {_SUPPORTED}"
            )
    return None


_SUPPORTED = (
    "emakit averages FSDP1's flat shards (FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD; use_orig_params True or "
    f"False) outside FSDP's forward and backward passes, {FSDP2_WAY}"
)
_UNSHARDED = (
    "that FSDP has unsharded now (inside its forward or backward pass, or FSDP.summon_full_params): emakit averages "
    "and swaps each rank's flat shards, which are then not what the module holds; call ema.update(model) and "
    "ema.ema_weights(model) outside them (no gather is needed: each rank averages its own shard), "
    f"{FSDP2_WAY}"
)


def check_sharded(tensors: list[torch.Tensor]) -> None:
    """Raise ValueError if FSDP has any of ``tensors``' units unsharded now: a write into the shards then would be lost
    (``summon_full_params`` writes the full parameters back on exit) or not seen by the running forward pass."""
    for tensor in tensors:
        found = _handle(tensor)
        if found is not None and _is_unsharded_now(found[0]):
            raise ValueError(
                f"the EMA cannot write into {found[0].flat_param._fqns}: they belong to a unit {_UNSHARDED}"
            )


def after_write(tensors: list[torch.Tensor]) -> None:
    """After this rank's shards of ``tensors`` were written: free the unsharded copies FSDP kept of their units, so
    that the next forward pass gathers the shards anew. FSDP keeps the root unit unsharded after its forward pass
    (the backward pass would gather it again) and skips the next gather while that copy is allocated: after a
    ``no_grad`` evaluation the next forward would otherwise run on stale weights (the training weights inside a
    swap, the average after it). What FSDP itself does when it reshards (``_reshard``)."""
    handles = {id(found[0]): found[0] for found in map(_handle, tensors) if found is not None}
    for handle in handles.values():
        initialized = hasattr(handle.flat_param, "_local_shard")  # FSDP's lazy init: no unsharded copy before it
        if (
            handle.uses_sharded_strategy
            and initialized
            and not _is_unsharded_now(handle)
            and not handle.needs_unshard()
        ):
            handle.reshard(free_unsharded_flat_param=True)
            handle.post_reshard()
            handle._prefetched = False


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's data of FSDP1 tensor ``tensor``: a FlatParameter without its padding, else the view itself."""
    return tensor.narrow(0, 0, local_numel(tensor)) if is_flat(tensor) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """How many elements :func:`local` has."""
    return tensor.numel() - getattr(tensor, "_shard_numel_padded", 0) if is_flat(tensor) else tensor.numel()


def layout(tensor: torch.Tensor) -> dict[str, Any]:
    """Whose data a state of ``tensor``'s average holds: ``{"engine": "fsdp1", "rank": r, "world_size": n}`` in the
    group the unit is sharded over (under ``HYBRID_SHARD`` the shard group; ``NO_SHARD`` too: its flat layout)."""
    found = _handle(tensor)
    if found is None:
        raise ValueError(f"FSDP1 tensor of shape {tuple(tensor.shape)} {refusal(tensor, [])}")
    handle = found[0]
    return {"engine": "fsdp1", "rank": handle.rank, "world_size": handle.world_size}


def clean_name(name: str) -> str:
    """``name`` without FSDP's (and activation checkpointing's) wrapper prefixes: the unwrapped model's key."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def export_names(name: str, tensor: torch.Tensor) -> list[str]:
    """The names of the full tensors the average of tracked tensor ``name`` stands for: a FlatParameter's original
    parameters (``prefix._flat_param`` -> ``prefix.<fqn>`` for each of its ``_fqns``), else ``[name]``."""
    if not is_flat(tensor):
        return [name]
    prefix = name[: -len("_flat_param")]
    return [prefix + fqn for fqn in tensor._fqns]


def state_dict_keys(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, str]:
    """The unwrapped model's ``state_dict`` key of each full tensor the averages of ``named`` stand for -> its export
    name (:func:`export_names`), tied parameters under each of their names, from FSDP's metadata: the wrapper's own
    ``state_dict()`` would gather the whole model."""
    name_of = {id(tensor): name for name, tensor in named.items()}
    keys: dict[str, str] = {}
    persistent = (
        (f"{path}{'.' if path else ''}{key}", buffer)
        for path, module in model.named_modules(remove_duplicate=False)
        for key, buffer in module._buffers.items()
        if buffer is not None and key not in module._non_persistent_buffers_set
    )
    for key, tensor in [*model.named_parameters(remove_duplicate=False), *persistent]:
        name = name_of.get(id(tensor))
        if name is None:
            continue
        if not is_flat(tensor):
            keys.setdefault(clean_name(key), name)
            continue
        exports = export_names(name, tensor)
        keys.update((clean_name(export), export) for export in exports)
        prefix = name[: -len("_flat_param")]
        for shared in tensor._shared_param_infos:  # tied parameters: one copy in the flat parameter
            alias = ".".join(filter(None, (shared.module_name, shared.param_name)))
            prim = ".".join(filter(None, (shared.prim_module_name, shared.prim_param_name)))
            keys[clean_name(prefix + alias)] = exports[tensor._fqns.index(prim)]
    return keys


def exported(name: str, tensor: torch.Tensor, value: torch.Tensor, copy: bool) -> Iterator[tuple[str, Any]]:
    """``(export name, full tensor)`` for each original parameter whose local data ``value`` (of :func:`local`'s
    shape) holds: on rank 0 of the unit's group (every rank under ``NO_SHARD``), None elsewhere. Collective for
    sharded strategies: every rank calls, in one order."""
    found = _handle(tensor)
    if found is None:
        raise ValueError(f"{name!r} {refusal(tensor, [])}")
    handle, index = found
    flat = handle.flat_param
    if index is not None:  # an original parameter: value is all of this rank's slice of it
        if not handle.uses_sharded_strategy:
            yield name, value.detach().clone() if copy else value
        else:
            yield name, _gather_param(handle, index, value.reshape(-1))
        return
    for export, i in zip(export_names(name, tensor), range(flat._num_params)):
        info = flat._shard_param_infos[i]
        piece = value.narrow(0, info.offset_in_shard or 0, info.numel_in_shard or 0) if info.in_shard else value[:0]
        if handle.uses_sharded_strategy:
            yield export, _gather_param(handle, i, piece)
        else:
            yield export, piece.view(flat._shapes[i]).clone()


def gathered(tensor: torch.Tensor, value: torch.Tensor, copy: bool = True) -> torch.Tensor | None:
    """The full average of FSDP1 original parameter ``tensor`` whose slice on this rank is ``value``: on rank 0 of its
    group (every rank under ``NO_SHARD``), None elsewhere. A FlatParameter stands for several: :func:`exported`."""
    if is_flat(tensor):
        raise ValueError(f"an FSDP1 FlatParameter ({len(tensor._fqns)} parameters) stands for several tensors")
    ((_, full),) = exported("", tensor, value, copy)
    return full


def _starts(handle: FlatParamHandle) -> list[int]:
    """Where each original parameter starts in the unsharded flat parameter (alignment padding counted)."""
    flat, starts, position = handle.flat_param, [], 0
    for numel, padding in zip(flat._numels_with_padding, flat._is_padding_mask):
        if not padding:
            starts.append(position)
        position += numel
    return starts


def _gather_param(handle: FlatParamHandle, index: int, piece: torch.Tensor) -> torch.Tensor | None:
    """Original parameter ``index`` of ``handle`` in full, on rank 0 of its group (None elsewhere), from each rank's
    slice (``piece``: this rank's). Collective: every rank of the group calls."""
    flat = handle.flat_param
    shard, ranks, group = flat._sharded_size.numel(), handle.world_size, handle.process_group
    start, numel = _starts(handle)[index], flat._numels[index]
    slices = [  # per rank: (first element of the flattened parameter it holds, how many)
        (max(start, k * shard) - start, max(0, min(start + numel, (k + 1) * shard) - max(start, k * shard)))
        for k in range(ranks)
    ]
    if piece.numel() != slices[handle.rank][1]:
        raise ValueError(
            f"FSDP1 parameter {flat._fqns[index]!r}: this rank's average holds {piece.numel()} elements, FSDP's "
            f"layout says {slices[handle.rank][1]}"
        )
    width = max(count for _, count in slices)
    padded = torch.zeros(width, dtype=piece.dtype, device=piece.device)
    padded[: piece.numel()].copy_(piece)
    main = dist.get_global_rank(group, 0)
    if handle.rank != 0:
        dist.gather(padded, None, dst=main, group=group)
        return None
    received = [torch.empty_like(padded) for _ in range(ranks)]
    dist.gather(padded, received, dst=main, group=group)
    full = torch.empty(numel, dtype=piece.dtype, device=piece.device)
    for (first, count), part in zip(slices, received):
        full[first : first + count].copy_(part[:count])
    return full.view(flat._shapes[index])
