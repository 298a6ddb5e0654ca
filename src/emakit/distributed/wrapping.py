"""Wrapping a model for many processes: DDP, or FSDP2 sharding in place; what the user already wrapped.

``parallelism``: ``"ddp"`` (:class:`~torch.nn.parallel.DistributedDataParallel`), ``"fsdp"`` (FSDP2,
:func:`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all ranks: every submodule that owns
parameters is one unit, then the root), or ``None``: DDP when the world size is above 1, unless the model is
already wrapped by the user. With world size 1 every choice is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from emakit.distributed.environment import TORCH_VERSION, _meshes, world_size

__all__ = [
    "FSDP_ON_CPU_SINCE",
    "PARALLELISMS",
    "check_fsdp_device",
    "check_parallelism",
    "check_wrapping",
    "forward_module",
    "repoint_optimizers",
    "wrap_model",
    "wrapper_kind",
]

PARALLELISMS = (None, "ddp", "fsdp")
FSDP_ON_CPU_SINCE = (2, 9)  # before: no CPU support (2.6), or gloo sums gradients instead of averaging (2.7, 2.8)


def check_parallelism(parallelism: str | None) -> str | None:
    """``parallelism`` itself when it is one of :data:`PARALLELISMS`, else ValueError."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism={parallelism!r} is not supported: use one of {PARALLELISMS}")
    return parallelism


def check_fsdp_device(device: torch.device) -> None:
    """ValueError where FSDP2 would train the wrong model: on the CPU (gloo) before torch 2.9.

    torch 2.6 has no CPU support in FSDP2; 2.7 and 2.8 sum the gradients of the ranks over gloo
    instead of averaging them (pytorch/pytorch#162338), with no error.
    """
    if device.type == "cpu" and TORCH_VERSION < FSDP_ON_CPU_SINCE:
        raise ValueError(
            f"FSDP2 on the CPU (gloo) needs torch >= {'.'.join(map(str, FSDP_ON_CPU_SINCE))}: torch "
            f"{torch.__version__} has no CPU support or sums the ranks' gradients instead of averaging them, "
            "training the wrong model; use parallelism='ddp', CUDA devices, or a newer torch"
        )


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def wrapper_kind(model: nn.Module) -> str | None:
    """``"ddp"`` or ``"fsdp"`` when the user already wrapped ``model`` (or FSDP-sharded any submodule), else None."""
    inner = model._modules.get("_orig_mod")  # under torch.compile
    if inner is None:
        inner = model
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return "ddp"
    if any(_is_fsdp(module) for module in inner.modules()):
        return "fsdp"
    return None


def forward_module(model: nn.Module) -> nn.Module:
    """The module to call for evaluation: ``model`` without a DDP wrapper (whose forward may run collectives)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: every submodule owning parameters becomes a unit (innermost first), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    _meshes[id(mesh)] = mesh  # its hold on the process group is dropped at exit (_destroy)
    for module in reversed(list(model.modules())):  # reversed pre-order: children before their parents
        if module is not model and next(module.parameters(recurse=False), None) is not None:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def check_wrapping(model: nn.Module, parallelism: str | None) -> str | None:
    """What the user wrapped ``model`` in (see :func:`wrapper_kind`); ValueError when ``parallelism`` asks for more."""
    check_parallelism(parallelism)
    kind = wrapper_kind(model)
    if kind is not None and parallelism is not None:
        raise ValueError(
            f"the model is already wrapped for {kind.upper()} ({type(model).__name__}) and parallelism="
            f"{parallelism!r} asks emakit to wrap it again: pass the plain model with parallelism={parallelism!r}, "
            "or your wrapped model with parallelism=None"
        )
    return kind


def wrap_model(model: nn.Module, parallelism: str | None, device: torch.device) -> nn.Module:
    """Prepare ``model`` (already on ``device``) for this world; returns the module to call for training.

    One process: ``model``. A model the user wrapped (DDP, FSDP) with ``parallelism=None``: ``model`` as it is.
    ``"ddp"`` (and ``None``): a ``DistributedDataParallel`` around ``model``. ``"fsdp"``: ``model`` itself, sharded
    in place by ``fully_shard`` (its parameters become DTensors: build optimizers afterwards, or let the trainer
    re-point them). Raises ValueError for an unknown ``parallelism`` or a user-wrapped model with ``parallelism``.
    """
    kind = check_wrapping(model, parallelism)
    if world_size() <= 1 or kind is not None:
        return model
    if parallelism == "fsdp":
        _fully_shard(model, device)
        return model
    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if (device.type == "cuda") else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def repoint_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], before: dict[str, nn.Parameter], model: nn.Module
) -> None:
    """Point optimizers built on ``model``'s parameters ``before`` FSDP replaced them at the new ones, by name.

    Raises ValueError for an optimizer that already has state (it would be of the unsharded parameters) or
    that holds a parameter that is not the model's.
    """
    after = dict(model.named_parameters())
    current = {id(param) for param in after.values()}
    new_of = {id(param): after[name] for name, param in before.items() if name in after}
    for index, optimizer in enumerate(optimizers):
        if optimizer.state:
            raise ValueError(
                f"optimizers[{index}] already has state; with parallelism='fsdp' build optimizers before any "
                "step, or pass optimizers=None for the default"
            )
        for group in optimizer.param_groups:
            params = group["params"]
            if all(id(param) in current for param in params):
                continue
            unknown = [p for p in params if id(p) not in new_of]
            if unknown:
                raise ValueError(
                    f"optimizers[{index}] holds a parameter of shape {tuple(unknown[0].shape)} that is not one of "
                    "the model's: with parallelism='fsdp' optimizers may hold only the model's parameters"
                )
            group["params"] = [new_of[id(param)] for param in params]
