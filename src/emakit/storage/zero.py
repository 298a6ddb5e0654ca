"""DeepSpeed ZeRO: where a parameter's data lives on this rank, what its average follows, how a full tensor reaches
rank 0, and the fp32 master copies a copy into the model must reach too.

**ZeRO-3.** Outside forward a parameter ``p`` is an empty placeholder (``p.numel() == 0``; small ones under
``stage3_param_persistence_threshold`` are also kept whole in ``p.data``). Rank ``r`` of ``n`` holds elements
``[r * s, (r + 1) * s)`` of the flattened tensor in ``p.ds_tensor``, ``s = ceil(p.ds_numel / n)``; the last
partitions are padded, so only the first ``k_r`` elements are the tensor's::

    k_r          = clamp(p.ds_numel - r * s, 0, s)
    partition(p) = p.ds_tensor[:k_r]                 what the forward pass gathers: a swap writes it
    master(p)    = fp32 master partition[:k_r]       what the optimizer steps: the average follows it
    full         = cat(rank 0's, ..., rank n-1's partitions padded to s)[:p.ds_numel].view(p.ds_shape)

The average follows the **fp32 master partition** where the engine keeps one (``bf16``/``fp16`` training, and
fp32 training too, where it holds the same values as ``ds_tensor``): it is what the optimizer steps and what
DeepSpeed itself exports as the model (``zero_to_fp32``, ``safe_get_full_fp32_param``); ``ds_tensor`` under bf16 is
its rounding, which an average of rounded terms would keep. Frozen parameters have no master: their partition is
followed.

**ZeRO-1/2.** Parameters are whole on every rank (bf16 under bf16) and averaged as they are; the fp32 masters are
split across the ranks in flat partitions that cut through parameters (``p._hp_mapping``: this rank's fragment).
Following them would take a collective per update (``safe_get_full_fp32_param`` all-reduces), so the average
follows the module's weights: the same values under fp32, their bf16 rounding under bf16 (averaged in fp32). A copy
of the average into the model (``train_with_ema_weights``) writes this rank's master fragment too
(:func:`write_master`), else the next step would restore the old weights from it.

Nothing here imports DeepSpeed: a ZeRO parameter exists only once DeepSpeed made it.

Example (on every rank of a ZeRO-3 engine)::

    >>> p = engine.module.weight            # p.numel() == 0, p.ds_shape == (64, 32), 2 ranks
    >>> partition(p).shape, master(p).dtype
    (torch.Size([1024]), torch.float32)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

__all__ = [
    "gather_to_main",
    "has_master_apart",
    "is_zero3",
    "layout",
    "master",
    "part_of_whole",
    "partition",
    "real_numel",
    "refusal",
    "regather",
    "write_master",
]

SUPPORTED = (
    "emakit averages ZeRO-3 partitions held in memory (on the device or offloaded to the CPU), partitioned over "
    "all ranks"
)

if TYPE_CHECKING:  # DeepSpeed ships no type hints: what its parameters carry, as far as emakit reads them
    import enum

    from torch import nn

    class Zero3Parameter(nn.Parameter):
        """A DeepSpeed ZeRO-3 parameter (:func:`is_zero3`)."""

        ds_id: int
        ds_numel: int  # the whole tensor's
        ds_shape: torch.Size
        ds_tensor: torch.Tensor  # this rank's partition, padded
        ds_status: enum.Enum  # ZeroParamStatus: NOT_AVAILABLE, INFLIGHT or AVAILABLE (gathered whole)
        ds_process_group: dist.ProcessGroup | None

        def partition(self, param_list: list[Zero3Parameter], has_been_updated: bool) -> None: ...
        def all_gather(self, param_list: list[Zero3Parameter]) -> None: ...

    class Zero12Parameter(nn.Parameter):
        """A DeepSpeed ZeRO-1/2 parameter with an fp32 master fragment kept apart (:func:`has_master_apart`)."""

        def set_full_hp_param(self, value: torch.Tensor) -> None: ...


def is_zero3(tensor: torch.Tensor) -> TypeGuard[Zero3Parameter]:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (partitioned or persistent), without importing DeepSpeed."""
    return hasattr(tensor, "ds_id")


def has_master_apart(tensor: torch.Tensor) -> TypeGuard[Zero12Parameter]:
    """Whether a ZeRO-1/2 optimizer keeps an fp32 master fragment of ``tensor`` apart from it (``_hp_mapping``)."""
    return hasattr(tensor, "_hp_mapping") and not is_zero3(tensor)


def write_master(p: Zero12Parameter, value: torch.Tensor) -> None:
    """Write the whole ``value`` of ZeRO-1/2 parameter ``p`` into this rank's fragment of its fp32 master (local:
    every rank holds ``value`` whole), as ``deepspeed.utils.safe_set_full_fp32_param`` does."""
    p.set_full_hp_param(value)


def layout(p: Zero3Parameter) -> tuple[int, int]:
    """``(rank, world size)`` of this process in the group ``p`` is partitioned over."""
    rank, world = getattr(p, "ds_zero_partition_rank", None), getattr(p, "ds_zero_partition_world_size", None)
    if rank is None or world is None:  # older DeepSpeed
        rank, world = dist.get_rank(group=p.ds_process_group), dist.get_world_size(group=p.ds_process_group)
    return rank, world


def real_numel(p: Zero3Parameter) -> int:
    """``k_r``: how many elements of this rank's partition are the tensor's (the rest is padding)."""
    size = p.ds_tensor.numel()
    rank, _ = layout(p)
    return max(0, min(size, p.ds_numel - rank * size))


def partition(p: Zero3Parameter) -> torch.Tensor:
    """This rank's elements of ``p`` in ``p.ds_tensor`` (a view, padding left out): what the forward pass gathers."""
    return p.ds_tensor.narrow(0, 0, real_numel(p))


def part_of_whole(p: Zero3Parameter, whole: torch.Tensor) -> torch.Tensor:
    """This rank's ``k_r`` elements of ``whole`` (a tensor of ``p``'s full shape, e.g. its average loaded from a
    state of whole tensors): the elements :func:`partition` holds of ``p``. No communication."""
    size = p.ds_tensor.numel()
    rank, _ = layout(p)
    return whole.reshape(-1).narrow(0, rank * size, real_numel(p))


def master(p: Zero3Parameter) -> torch.Tensor:
    """This rank's elements of ``p``'s fp32 master partition (a view into the optimizer's flat buffer), or
    :func:`partition` where there is none (a frozen parameter, no optimizer yet).

    DeepSpeed never re-points these flat buffers: the view stays the master's for the engine's life.
    """
    optimizer = getattr(p, "_z3_optimizer", None)
    if optimizer is None or not p.requires_grad:
        return partition(p)
    reason = _master_refusal(p, optimizer)
    if reason:
        raise ValueError(f"ZeRO-3 parameter (ds_id {p.ds_id}) {reason}")
    group, offset, _ = optimizer.grad_position[optimizer.get_param_id(p)]
    return optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, real_numel(p))


def _master_refusal(p: Zero3Parameter, optimizer: Any) -> str | None:
    """Why the average cannot follow ``p``'s fp32 master partition in place, or None."""
    if getattr(optimizer, "swap_optimizer", False):
        return f"has its fp32 master swapped to NVMe (offload_optimizer.device='nvme'); {SUPPORTED}"
    try:  # what deepspeed.utils.safe_get_local_fp32_param(p) reads, without its copy to the current device
        group, offset, _ = optimizer.grad_position[optimizer.get_param_id(p)]
        optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, real_numel(p))
    except (AttributeError, KeyError, IndexError, TypeError, RuntimeError) as error:
        return (
            f"has its fp32 master partition where emakit does not find it ({type(error).__name__}: {error}); "
            "emakit reads the layout of DeepSpeed 0.19"
        )
    return None


def refusal(p: Zero3Parameter) -> str | None:
    """Why emakit cannot average ZeRO-3 parameter ``p``, or None when it can."""
    where = f"is a DeepSpeed ZeRO-3 parameter (ds_id {getattr(p, 'ds_id', '?')})"
    if getattr(p, "ds_tensor", None) is None:
        return f"{where} without a partition (no p.ds_tensor): it is not partitioned yet; {SUPPORTED}"
    if getattr(p, "nvme_swapper", None) is not None:
        return f"{where} whose partition is offloaded to NVMe (offload_param.device='nvme'); {SUPPORTED}"
    if getattr(p, "ds_zero_param_process_group", None) is not None:
        return (
            f"{where} with a secondary partition (hpZ, zero_hpz_partition_size > 1), which the forward pass gathers "
            f"instead of p.ds_tensor; {SUPPORTED}"
        )
    if hasattr(p.ds_tensor, "ds_quant_scale"):
        return f"{where} whose partition is quantized (zero_quantized_nontrainable_weights); {SUPPORTED}"
    optimizer = getattr(p, "_z3_optimizer", None)
    if optimizer is not None and p.requires_grad and (reason := _master_refusal(p, optimizer)):
        return f"{where} {reason}"
    _, world = layout(p)
    if dist.is_initialized() and world != dist.get_world_size():
        return (
            f"{where} partitioned over {world} of the {dist.get_world_size()} ranks (MiCS, or expert parameters of a "
            f"mixture of experts); {SUPPORTED}"
        )
    return None


def regather(params: list[Zero3Parameter]) -> None:
    """After their partitions were written: gather anew the parameters the engine keeps whole (persistent ones,
    ``ds_status`` AVAILABLE), as DeepSpeed does after an optimizer step. Collective: every rank calls."""
    whole = [p for p in params if p.ds_status.name == "AVAILABLE"]
    if whole:
        whole[0].partition(param_list=whole, has_been_updated=False)  # frees p.data; the partitions stay
        whole[0].all_gather(param_list=whole)


def gather_to_main(p: Zero3Parameter, value: torch.Tensor) -> torch.Tensor | None:
    """The full tensor whose partition on this rank is ``value`` (``k_r`` elements): on rank 0 of ``p``'s group, in
    ``value``'s dtype and ``p``'s full shape; None on the others. Collective: every rank calls."""
    size, group = p.ds_tensor.numel(), p.ds_process_group
    padded = torch.zeros(size, dtype=value.dtype, device=p.ds_tensor.device)
    padded[: value.numel()].copy_(value.reshape(-1))
    main = dist.get_global_rank(group, 0) if group is not None else 0
    if dist.get_rank() != main:
        dist.gather(padded, None, dst=main, group=group)
        return None
    pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=group))]
    dist.gather(padded, pieces, dst=main, group=group)
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).to(value.device)
