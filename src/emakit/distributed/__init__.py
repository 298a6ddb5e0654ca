"""Multi-process training on ``torch.distributed``: the torchrun environment, wrapping, sharded data, reductions.

Launch a script that builds an :class:`~emakit.Trainer` with ``torchrun --nproc_per_node N script.py``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables) for every process, and the trainer calls
:func:`initialize`, :func:`wrap_model`, :func:`shard_train_loader` and :func:`shard_eval_loader` from here. Each
helper is also usable by hand, in any loop.

- Process group (:mod:`~emakit.distributed.environment`): ``nccl`` for CUDA devices, ``gloo`` for the CPU, with a
  timeout (``EMAKIT_DIST_TIMEOUT`` seconds, default 300) so that when a rank fails or hangs the others raise
  (:mod:`~emakit.distributed.errors`) instead of waiting forever. :func:`is_main`: whether this is rank 0.
- ``parallelism`` (:mod:`~emakit.distributed.wrapping`): ``"ddp"``
  (:class:`~torch.nn.parallel.DistributedDataParallel`), ``"fsdp"`` (FSDP2,
  :func:`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all ranks: every submodule that owns
  parameters is one unit, then the root), or ``None``: DDP when the world size is above 1, unless the model is
  already wrapped by the user. With world size 1 every choice is a no-op.
- Data (:mod:`~emakit.distributed.data`): a ``DataLoader`` with a default sampler (sequential or random) is rebuilt
  with a sampler that gives each rank its share, keeping every other setting. Training uses a
  ``DistributedSampler`` (it pads by repeating samples so every rank runs the same number of batches); evaluation
  uses :class:`EvalShardSampler`, which never repeats a sample, so summed metrics equal those of one process over
  the whole set (:mod:`~emakit.distributed.reductions`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emakit.distributed.environment import (
    TORCH_VERSION,
    barrier,
    default_device,
    initialize,
    is_main,
    local_rank,
    rank,
    timeout_seconds,
    world_size,
)
from emakit.distributed.errors import CollectiveError, explain_failures
from emakit.distributed.per_rank import PER_RANK, gather_states, is_per_rank, own_state
from emakit.distributed.reductions import all_reduce_sums, from_rank0, max_over_ranks, sum_over_ranks
from emakit.distributed.wrapping import (
    FSDP_ON_CPU_SINCE,
    PARALLELISMS,
    check_fsdp_device,
    check_parallelism,
    check_wrapping,
    forward_module,
    repoint_optimizers,
    wrap_model,
    wrapper_kind,
)

if TYPE_CHECKING:  # imported on first use (__getattr__ below); type checkers see them as they are
    from emakit.distributed.data import EvalShardSampler, shard_eval_loader, shard_train_loader

__all__ = [
    "FSDP_ON_CPU_SINCE",
    "PARALLELISMS",
    "PER_RANK",
    "TORCH_VERSION",
    "CollectiveError",
    "EvalShardSampler",
    "all_reduce_sums",
    "barrier",
    "check_fsdp_device",
    "check_parallelism",
    "check_wrapping",
    "default_device",
    "explain_failures",
    "forward_module",
    "from_rank0",
    "gather_states",
    "initialize",
    "is_main",
    "is_per_rank",
    "local_rank",
    "max_over_ranks",
    "own_state",
    "rank",
    "repoint_optimizers",
    "shard_eval_loader",
    "shard_train_loader",
    "sum_over_ranks",
    "timeout_seconds",
    "world_size",
    "wrap_model",
    "wrapper_kind",
]


_DATA = ("EvalShardSampler", "shard_eval_loader", "shard_train_loader")


def __getattr__(name: str) -> object:
    """The data helpers, imported on first use: ``torch.utils.data``'s samplers cost an import ``import emakit``
    need not pay."""
    if name in _DATA:
        from emakit.distributed import data

        return getattr(data, name)
    raise AttributeError(f"module 'emakit.distributed' has no attribute {name!r}")
