"""Where an :class:`~emakit.EMA`'s state goes inside a trainer's checkpoint folder: one file, or one per rank.

An average every rank holds whole (one process, DDP, DeepSpeed ZeRO-1/2) is the same on every rank: the main
process writes it once, ``emakit_ema.pt``. An average whose ranks hold different data (DeepSpeed ZeRO-3: each
rank its own partitions, which its state names in ``partitioning``; FSDP2: each rank's local shards, as DTensors) is
written by every rank, each its own data, ``emakit_ema-rank{r}.pt``; it resumes on the same rank of the same world
size (``EMA.load_state_dict`` refuses another rank's ZeRO-3 partitions). Loading reads this rank's file where there
is one, else the single file, so checkpoints written before per-rank files existed still resume. Every file is
written through :func:`emakit.atomic.atomic_write`: whole or not at all.

Example (on every rank, after the trainer wrote ``checkpoint-100/``)::

    >>> save_state(ema, "out/checkpoint-100", rank=dist.get_rank(), main=dist.get_rank() == 0)  # doctest: +SKIP
    PosixPath('out/checkpoint-100/emakit_ema-rank1.pt')       # ZeRO-3, rank 1; None on rank 1 under DDP
    >>> load_state(ema, "out/checkpoint-100", rank=dist.get_rank())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from emakit.atomic import atomic_write
from emakit.ema import EMA
from emakit.export import HF_EMA_STATE_NAME
from emakit.storage import sharded

__all__ = ["EMA_STATE_NAME", "current_rank", "has_state", "load_state", "per_rank", "rank_state_name", "save_state"]

EMA_STATE_NAME = HF_EMA_STATE_NAME
"""The file, inside a checkpoint folder, holding ``EMA.state_dict()`` of an average every rank holds whole (where
``emakit export`` looks for it)."""

_RANK_FILE = re.compile(r"emakit_ema-rank(\d+)\.pt")


def rank_state_name(rank: int) -> str:
    """The file holding rank ``rank``'s ``EMA.state_dict()`` of an average whose ranks hold different data."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an int >= 0")
    return f"emakit_ema-rank{rank}.pt"


def per_rank(ema: EMA) -> bool:
    """Whether each rank's state of ``ema`` holds its own data (:attr:`EMA.state_is_per_rank`: ZeRO-3 partitions,
    FSDP1 flat shards, ``shard_over_ranks`` slices; and FSDP2 local shards), so every rank must save its own."""
    if ema.state_is_per_rank:
        return True
    model = ema.shadow.attached_model()
    return model is not None and any(sharded.is_dtensor(t) for t in model.parameters())


def current_rank() -> int:
    """This process's rank in the default process group, 0 where there is none."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_state(ema: EMA, folder: str | os.PathLike, rank: int, main: bool) -> Path | None:
    """Write ``ema.state_dict()`` into ``folder`` (which must exist) and return the file written, or None.

    Call it on every rank. A per-rank average (:func:`per_rank`) is written by every rank to
    ``rank_state_name(rank)``; a whole one by the ``main`` process only, to ``emakit_ema.pt`` (None elsewhere).
    """
    if per_rank(ema):
        name = rank_state_name(rank)
    elif main:
        name = EMA_STATE_NAME
    else:
        return None
    path = Path(folder) / name
    with atomic_write(path) as file:
        torch.save(ema.state_dict(), file)
    return path


def has_state(folder: str | os.PathLike, rank: int) -> bool:
    """Whether ``folder`` holds a state rank ``rank`` can load (its own file, or the single one)."""
    return (Path(folder) / rank_state_name(rank)).is_file() or (Path(folder) / EMA_STATE_NAME).is_file()


def load_state(ema: EMA, folder: str | os.PathLike, rank: int) -> Path:
    """Restore ``ema`` from ``folder`` as :func:`save_state` wrote it and return the file read: rank ``rank``'s own
    file where there is one, else ``emakit_ema.pt``.

    Raises FileNotFoundError naming what the folder holds when neither is there (no EMA state at all, or per-rank
    files of a run with fewer ranks: resume on the same world size).
    """
    folder = Path(folder)
    path = folder / rank_state_name(rank)
    if not path.is_file():
        path = folder / EMA_STATE_NAME
    if not path.is_file():
        found = (_RANK_FILE.fullmatch(file.name) for file in folder.glob("emakit_ema-rank*.pt"))
        ranks = sorted(int(match.group(1)) for match in found if match)
        if ranks:
            raise FileNotFoundError(
                f"checkpoint {str(folder)!r} holds the EMA states of ranks {ranks} (each rank's own partitions), but "
                f"none for rank {rank}: resume on the world size that wrote it ({len(ranks)} ranks)"
            )
        raise FileNotFoundError(
            f"checkpoint {str(folder)!r} holds no {EMA_STATE_NAME} (nor {rank_state_name(rank)}): it was not written "
            "with an EMATrainerCallback, so the average cannot be resumed exactly"
        )
    ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path
