"""States that differ per rank (an EMA whose ranks each keep a slice of the average), in a checkpoint one rank writes.

Under DDP one rank writes a checkpoint for all: every rank holds the same training state. A state that is this
rank's only (``EMA.state_is_per_rank``: ``shard_over_ranks`` slices, ZeRO-3 partitions) is gathered to rank 0 for it,
one entry per rank (:func:`gather_states`), and each rank takes its own back on load (:func:`own_state`), on a run
of the same world size; another is refused, naming both.

Example (on every rank)::

    >>> saved = gather_states(ema.state_dict())          # rank 0: {"per_rank_states": [rank 0's, rank 1's]}
    >>> ema.load_state_dict(own_state(saved_on_disk))    # each rank: its own entry
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from emakit.distributed.environment import rank, world_size

__all__ = ["PER_RANK", "gather_states", "is_per_rank", "own_state"]

PER_RANK = "per_rank_states"


def _on_host(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: _on_host(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_host(value) for value in state)
    return state


def gather_states(state: Any) -> dict[str, list[Any]] | None:
    """Every rank's ``state`` on rank 0 as ``{"per_rank_states": [rank 0's, ..., rank n-1's]}`` (tensors moved to the
    CPU), None on the other ranks. Collective: every rank calls. In one process: ``{"per_rank_states": [state]}``."""
    if not dist.is_initialized() or world_size() <= 1:
        return {PER_RANK: [state]}
    state = _on_host(state)
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return {PER_RANK: gathered} if gathered is not None else None


def is_per_rank(saved: Any) -> bool:
    """Whether ``saved`` was made by :func:`gather_states`."""
    return isinstance(saved, dict) and set(saved) == {PER_RANK}


def own_state(saved: Any) -> Any:
    """This rank's entry of a state made by :func:`gather_states`; any other state as it is.

    Raises ValueError when the state was saved by another number of ranks, naming both.
    """
    if not is_per_rank(saved):
        return saved
    states, ranks = saved[PER_RANK], world_size() if dist.is_initialized() else 1
    if len(states) != ranks:
        raise ValueError(
            f"the state holds the per-rank states of {len(states)} rank(s), but this run has {ranks}: it resumes on "
            f"{len(states)} rank(s), each loading its own"
        )
    return states[rank() if dist.is_initialized() else 0]
