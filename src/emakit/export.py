"""EMA weights as a safetensors file that loads into a plain model with ``load_state_dict``.

The file's keys are the model's ``state_dict`` keys (tied weights under each of their
names), its tensors the average's. ``EMA.save_ema_weights(path)`` writes it from a live EMA;
``emakit export CHECKPOINT OUT.safetensors`` writes it from a trainer checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from emakit import distributed
from emakit.atomic import atomic_path
from emakit.tracked import is_dtensor

__all__ = ["add_arguments", "ema_states_in_checkpoint", "run", "save_ema_state", "save_state_dict"]


def save_state_dict(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a model ``state_dict`` to ``path`` as safetensors, atomically (rank 0 writes); returns the path."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}  # tied: apart
    path = Path(path)
    if not distributed.is_main():
        return path
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt", "producer": "emakit"})
    return path


def save_ema_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write the weights of an ``EMA.state_dict()`` to ``path`` as safetensors; returns the path.

    Sharded (DTensor) averages are gathered here: every rank must call, rank 0 writes.
    """
    weights, keys = state.get("weights") or {}, state.get("state_dict_keys") or {}
    if not state.get("started") or not weights:
        raise ValueError("the EMA has not started: there are no EMA weights to save")
    if state.get("partitioning"):
        raise ValueError(
            f"the EMA state holds one rank's data ({state['partitioning']}), not the whole average: call "
            "ema.save_ema_weights(path) on every rank of the run, which gathers it"
        )
    full = {name: t.full_tensor() if is_dtensor(t) else t for name, t in weights.items()}
    return save_state_dict({key: full[name] for key, name in keys.items()}, path)


def ema_states_in_checkpoint(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The states of the EMA algorithms saved in a trainer checkpoint, in the trainer's order (not PostHocEMA's,
    whose averages are exported by ``emakit posthoc``)."""
    fields = {"started", "num_updates", "weights", "state_dict_keys"}  # what an EMA state holds and others do not
    return [a for a in checkpoint.get("algorithms", []) if isinstance(a, dict) and fields <= a.keys()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by emakit's Trainer")
    parser.add_argument("output", type=Path, help="the safetensors file to write")
    parser.add_argument("--index", type=int, default=0, help="which EMA, when the run had several (default 0)")


def run(args: argparse.Namespace) -> int:
    from emakit.trainer.checkpoint import load_checkpoint

    if args.checkpoint.is_dir():
        raise SystemExit(
            f"emakit export: {str(args.checkpoint)!r} is a sharded (FSDP) checkpoint folder: call "
            "ema.save_ema_weights(path) on every rank of the run, which gathers the shards"
        )
    checkpoint = load_checkpoint(args.checkpoint)
    if any(isinstance(a, dict) and set(a) == {"per_rank_states"} for a in checkpoint.get("algorithms", [])):
        raise SystemExit(
            f"emakit export: checkpoint {str(args.checkpoint)!r} holds an EMA split over ranks "
            "(shard_over_ranks=True): "
            "resume the run on as many ranks and call ema.save_ema_weights(path) on every rank, which gathers it"
        )
    states = ema_states_in_checkpoint(checkpoint)
    if not states:
        raise SystemExit(f"emakit export: checkpoint {str(args.checkpoint)!r} holds no EMA state")
    if not 0 <= args.index < len(states):
        raise SystemExit(f"emakit export: --index {args.index} is out of range: {len(states)} EMA(s) saved")
    path = save_ema_state(states[args.index], args.output)
    print(f"wrote {len(states[args.index]['state_dict_keys'])} EMA tensors to {path}")
    return 0
