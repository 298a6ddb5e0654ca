"""Checkpoints of sharded (FSDP2) runs: a folder, atomic as a whole.

Every DTensor of the trainer's state (weights, optimizer state, the EMA's shards) goes through
``torch.distributed.checkpoint`` (DCP): each rank writes its own shards, in parallel. The rest
(the clock, counters, RNG states: equal on every rank) goes into one small ``trainer.pt``
written by rank 0 with :func:`~emakit.trainer.checkpoint.save_checkpoint` and read with
:func:`~emakit.trainer.checkpoint.load_checkpoint` (``weights_only``, CRC-checked), where each
DTensor is replaced by a marker naming its DCP key.

The folder is written under a hidden temporary name and renamed into place by rank 0 after
every rank has finished, so a crash never leaves a folder under a checkpoint's name.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from emakit import distributed
from emakit.atomic import replace_folder
from emakit.trainer.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "PLAIN_FILE",
    "load_sharded_checkpoint",
    "marker_keys",
    "merge_sharded",
    "save_sharded_checkpoint",
    "split_sharded",
]

PLAIN_FILE = "trainer.pt"
_MARKER = "__dcp_key__"


def split_sharded(state: Any, key: str = "") -> tuple[Any, dict[str, DTensor]]:
    """``state`` with every DTensor replaced by ``{"__dcp_key__": key}``, and ``{key: DTensor}``.

    Keys are the paths through dicts and lists, joined by ``/``: ``"model/fc.weight"``.
    """
    if isinstance(state, DTensor):
        return {_MARKER: key}, {key: state}
    tensors: dict[str, DTensor] = {}
    if isinstance(state, dict):
        plain = {}
        for name, value in state.items():
            plain[name], found = split_sharded(value, f"{key}/{name}" if key else str(name))
            tensors.update(found)
        return plain, tensors
    if isinstance(state, (list, tuple)):
        parts = [split_sharded(value, f"{key}/{i}" if key else str(i)) for i, value in enumerate(state)]
        for _, found in parts:
            tensors.update(found)
        return type(state)(plain for plain, _ in parts), tensors
    return state, tensors


def merge_sharded(plain: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_sharded`: markers replaced by ``tensors[key]`` (DTensors, or whole tensors read
    without a process group)."""
    if isinstance(plain, dict):
        if set(plain) == {_MARKER}:
            key = plain[_MARKER]
            if key not in tensors:
                raise ValueError(f"the checkpoint has a sharded tensor {key!r} that this run does not")
            return tensors[key]
        return {name: merge_sharded(value, tensors) for name, value in plain.items()}
    if isinstance(plain, (list, tuple)):
        return type(plain)(merge_sharded(value, tensors) for value in plain)
    return plain


def save_sharded_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the folder ``path`` (collective: every rank calls it); returns the path."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    plain, tensors = split_sharded(state)
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier()
    dcp.save(tensors, checkpoint_id=str(partial))
    if distributed.is_main():
        save_checkpoint(partial / PLAIN_FILE, plain)
    distributed.barrier()
    if distributed.is_main():
        replace_folder(partial, path)
    distributed.barrier()
    return path


def load_sharded_checkpoint(path: str | Path, template: dict[str, Any]) -> dict[str, Any]:
    """Read the folder ``path`` into the shards of ``template`` (this run's own state); returns the merged state.

    Collective: every rank calls it. Raises ValueError naming the folder when its plain part is
    missing, refused or corrupt, or when its sharded tensors do not match this run's.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / PLAIN_FILE).is_file():
        raise ValueError(f"sharded checkpoint {str(path)!r} is incomplete: it has no {PLAIN_FILE}")
    plain = load_checkpoint(path / PLAIN_FILE)
    _, tensors = split_sharded(template)
    saved = set(marker_keys(plain))
    if saved != set(tensors):
        missing, extra = sorted(set(tensors) - saved), sorted(saved - set(tensors))
        first = (
            f"this run has {missing[0]!r}, the checkpoint does not"
            if missing
            else (f"the checkpoint has {extra[0]!r}, this run does not")
        )
        raise ValueError(f"sharded checkpoint {str(path)!r} is of another model or optimizer: {first}")
    try:
        dcp.load(tensors, checkpoint_id=str(path))
    except Exception as error:  # DCP raises many types for damaged or foreign folders
        raise ValueError(f"sharded checkpoint {str(path)!r} could not be read: {error}") from error
    return merge_sharded(plain, tensors)


def marker_keys(plain: Any) -> list[str]:
    """The DCP keys named by the markers in ``plain`` (a state as :func:`split_sharded` leaves it)."""
    if isinstance(plain, dict):
        if set(plain) == {_MARKER}:
            return [plain[_MARKER]]
        return [key for value in plain.values() for key in marker_keys(value)]
    if isinstance(plain, (list, tuple)):
        return [key for value in plain for key in marker_keys(value)]
    return []
