""":class:`~emakit.integrations.lightning.EMACallback`'s state in the checkpoints of Lightning's sharding strategies.

Where the model is sharded, each rank's EMA holds its own part of the average: DTensor shards under
``ModelParallelStrategy`` (FSDP2's ``fully_shard`` in ``configure_model``), fp32 master partitions under
``DeepSpeedStrategy`` with ZeRO-3. But Lightning saves callback states from rank 0 alone: ``ModelParallelStrategy``
pickles everything but the model and optimizers into its folder's ``meta.pt`` from rank 0, DeepSpeed writes its
``client_state`` from rank 0. Left there, every other rank's part would be lost and, on resume, every rank would
load rank 0's (a size error where the parts differ in shape, a silently wrong average where they do not; measured
with Lightning 2.6.6 and ``ModelParallelStrategy``). So:

- ``ModelParallelStrategy`` writing a checkpoint folder (``save_distributed_checkpoint=True``, its default): on
  save, the callback's DTensors move into the checkpoint's ``"state_dict"``, which ``torch.distributed.checkpoint``
  (DCP) writes shard by shard, under keys of their own (``"emakit/<callback state key>/ema/weights/<tensor>"``: no
  module has such a key), and its state in ``meta.pt`` keeps a marker naming each
  (:func:`emakit.trainer.sharded.split_sharded`). On load (``trainer.fit(..., ckpt_path=folder)``), before the
  callback's state is restored, every rank reads its shards of the marked keys from the folder
  (``trainer.ckpt_path``) into this run's layout. Lightning's own loading reads only the model's keys from
  ``"state_dict"`` and never sees these. Nothing is gathered.
- Strategies that write one file of full tensors (``ModelParallelStrategy(save_distributed_checkpoint=False)``) or
  callback states from rank 0 (``DeepSpeedStrategy`` under ZeRO-3): the average is saved whole, gathered to rank
  0's CPU memory one tensor at a time at each save (``EMA.state_dict(whole=True)``: collective), as the first
  strategy gathers the model itself; on load every rank keeps its part of each whole tensor
  (:func:`emakit.storage.sharded.localized`), so the state also resumes on another number of ranks.
- States of whole tensors (DDP, DeepSpeed ZeRO-1/2: every rank's average is the same) are saved as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch

from emakit.ema import EMA
from emakit.storage.sharded import is_dtensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

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
    """``"folder"`` where ``strategy`` writes a DCP folder (``ModelParallelStrategy`` by default), else ``"file"``
    (callback states written by rank 0 alone: its full-state variant, DeepSpeed, any other)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    folder = isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", True)
    return "folder" if folder else "file"


def place_shards(trainer: pl.Trainer, checkpoint: dict[str, Any], state_key: str, ema: EMA) -> None:
    """Put the per-rank data of the callback state ``checkpoint["callbacks"][state_key]`` (``{"ema": ...}``, the
    state of ``ema``) where every rank's is saved: DTensors into ``checkpoint["state_dict"]`` (DCP, a marker left in
    the state) when the strategy writes a checkpoint folder; otherwise the averages whole, gathered to rank 0 one
    tensor at a time (``ema.state_dict(whole=True)``: collective, every rank calls). States of whole tensors (DDP,
    ZeRO-1/2) are left as they are."""
    state = checkpoint.get("callbacks", {}).get(state_key)
    if state is None or not isinstance(state.get("ema"), dict) or "per_rank_states" in state["ema"]:
        return  # shard_over_ranks: every rank's slice is gathered into rank 0's state already (None elsewhere)
    partitions = state["ema"].get("partitioning") is not None  # DeepSpeed ZeRO-3: this rank's partitions
    if not partitions and not _holds_dtensors(state):
        return
    if partitions or _checkpoint_mode(trainer.strategy) != "folder":
        state["ema"] = ema.state_dict(whole=True)  # rank 0 writes the checkpoint: it holds the averages whole
        return
    from emakit.trainer.sharded import split_sharded

    plain, shards = split_sharded(state, key=f"{PREFIX}/{state_key}")
    checkpoint["callbacks"][state_key] = plain
    checkpoint["state_dict"].update(shards)


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

    shards = {key: cast("DTensor", torch.empty_like(here[key])) for key in wanted}  # DTensors like this run's
    dcp.load({"state_dict": shards}, checkpoint_id=str(path))
    checkpoint["callbacks"][state_key] = merge_sharded(state, shards)
