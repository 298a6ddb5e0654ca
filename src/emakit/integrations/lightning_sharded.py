""":class:`~emakit.integrations.lightning.EMACallback`'s state in the checkpoints of Lightning's sharding strategy.

Under ``ModelParallelStrategy`` (FSDP2's ``fully_shard`` in ``configure_model``) the EMA holds each rank's DTensor
shards of the average, different on every rank. Lightning writes such a checkpoint as a folder
(``save_distributed_checkpoint=True``, its default): the model's and optimizers' states through
``torch.distributed.checkpoint`` (DCP: every rank writes its shards), and everything else, callback states included,
pickled by rank 0 alone into ``meta.pt``. Left there, the average's shards would be rank 0's only, and on resume every
rank would load rank 0's (a size error where the shards differ in shape, a silently wrong average where they do not;
measured with Lightning 2.6.6). So:

- on save, the callback's DTensors move into the checkpoint's ``"state_dict"``, which DCP writes shard by shard,
  under keys of their own (``"emakit/<callback state key>/ema/weights/<tensor>"``: no module has such a key), and
  its state in ``meta.pt`` keeps a marker naming each (:func:`emakit.trainer.sharded.split_sharded`);
- on load (``trainer.fit(..., ckpt_path=folder)``), before the callback's state is restored, every rank reads its
  shards of the marked keys from the folder (``trainer.ckpt_path``) into this run's layout. Lightning's own loading
  reads only the model's keys from ``"state_dict"`` and never sees these.

With ``save_distributed_checkpoint=False`` the checkpoint is one file of full tensors written by rank 0: the average
is gathered into it like the model, one tensor at a time (collective, at each save), and on load each rank keeps its
part of each full tensor (:func:`emakit.storage.sharded.localized`). Strategies that write rank 0's objects only and
do not shard the checkpoint (any other strategy) are refused when the average holds shards, rather than saving rank
0's shards for every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from emakit.storage.sharded import is_dtensor

__all__ = ["load_shards", "place_shards"]

PREFIX = "emakit"


def _holds_dtensors(state: Any) -> bool:
    if is_dtensor(state):
        return True
    if isinstance(state, dict):
        return any(_holds_dtensors(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return any(_holds_dtensors(value) for value in state)
    return False


def _checkpoint_mode(strategy: pl.strategies.Strategy) -> str:
    """``"folder"`` (DCP shards), ``"file"`` (full tensors from rank 0) or ``"other"``, as ``strategy`` saves."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return "other"
    return "folder" if getattr(strategy, "_save_distributed_checkpoint", True) else "file"


def place_shards(trainer: pl.Trainer, checkpoint: dict[str, Any], state_key: str) -> None:
    """Put the sharded tensors of the callback state ``checkpoint["callbacks"][state_key]`` where each rank's shards
    are saved: into ``checkpoint["state_dict"]`` (DCP, a marker left in the state) when the strategy writes a folder,
    gathered to full tensors (on rank 0) when it writes one file. Collective when gathering: every rank calls."""
    state = checkpoint.get("callbacks", {}).get(state_key)
    if not _holds_dtensors(state):
        return
    mode = _checkpoint_mode(trainer.strategy)
    if mode == "other":
        raise ValueError(
            f"the EMA holds sharded (DTensor) averages, but {type(trainer.strategy).__name__} saves callback states "
            "from rank 0 only: every other rank's shards would be lost. Shard with "
            "lightning.pytorch.strategies.ModelParallelStrategy (fully_shard in configure_model), whose checkpoints "
            "the EMA's shards join"
        )
    from emakit.trainer.sharded import merge_sharded, split_sharded

    plain, shards = split_sharded(state, key=f"{PREFIX}/{state_key}")
    if mode == "folder":
        checkpoint["callbacks"][state_key] = plain
        checkpoint["state_dict"].update(shards)
        return
    kept = {}
    for key, shard in shards.items():  # one tensor at a time, in one order on every rank; only rank 0 keeps it
        full = shard.full_tensor()
        kept[key] = full.cpu() if trainer.is_global_zero else torch.empty(0)
        del full
    checkpoint["callbacks"][state_key] = merge_sharded(plain, kept)


def load_shards(
    trainer: pl.Trainer, checkpoint: dict[str, Any], state_key: str, template: Callable[[], dict[str, Any]]
) -> None:
    """Read the shards marked in ``checkpoint["callbacks"][state_key]`` (:func:`place_shards`) from the checkpoint
    folder ``trainer.ckpt_path`` into copies of the DTensors of ``template()`` (the callback's state in this run,
    laid out for the sharded model; called only when there are shards to read), and put them in place of the
    markers. Collective: every rank calls."""
    state = checkpoint.get("callbacks", {}).get(state_key)
    if state is None:
        return
    from emakit.trainer.sharded import marker_keys, merge_sharded, split_sharded

    wanted = marker_keys(state)
    if not wanted:
        return
    path = trainer.ckpt_path
    if path is None or not Path(path).is_dir():
        raise ValueError(
            f"the EMA's state names {len(wanted)} sharded tensors saved beside the model in a checkpoint folder "
            f"(torch.distributed.checkpoint), but the checkpoint being loaded is {str(path)!r}: load the folder "
            "through trainer.fit(..., ckpt_path=folder) with ModelParallelStrategy"
        )
    _, here = split_sharded(template(), key=f"{PREFIX}/{state_key}")
    missing = [key for key in wanted if key not in here]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} holds the EMA's shards of {missing[0]!r}, which this run's EMA does not "
            f"have ({len(missing)} such): it was saved for another model or other averages"
        )
    import torch.distributed.checkpoint as dcp

    shards = {key: torch.empty_like(here[key]) for key in wanted}
    dcp.load({"state_dict": shards}, checkpoint_id=str(path))
    checkpoint["callbacks"][state_key] = merge_sharded(state, shards)
