"""EMA weights as a safetensors file that loads into a plain model with ``load_state_dict``.

The file's keys are the model's ``state_dict`` keys (tied weights under each of their
names), its tensors the average's. ``EMA.save_ema_weights(path)`` writes it from a live EMA;
``emakit export CHECKPOINT OUT.safetensors`` writes it from a checkpoint of any run that kept an EMA
(:func:`ema_states_at`): emakit's Trainer (a ``.pt`` file, or the ``.dcp`` folder of a sharded run, whose
shards are read whole without a process group), Lightning (a ``.ckpt`` with an ``EMACallback``), the Hugging
Face Trainer (a ``checkpoint-N/`` folder with ``emakit_ema.pt``), accelerate (a ``save_state`` folder with the
EMA registered for checkpointing), or a file of ``torch.save(ema.state_dict())``.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from emakit import distributed
from emakit.atomic import atomic_path
from emakit.tracked import is_dtensor

__all__ = [
    "HF_EMA_STATE_NAME", "add_arguments", "ema_states_at", "ema_states_in_checkpoint", "run", "save_ema_state",
    "save_state_dict",
]  # fmt: skip

HF_EMA_STATE_NAME = "emakit_ema.pt"  # the EMA's state in a Hugging Face checkpoint-N/ folder
_EMA_FIELDS = {"started", "num_updates", "weights", "state_dict_keys"}  # what an EMA state holds and others do not


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
    whose = state.get("partitioning")
    if whose:  # one rank's ZeRO-3 partitions or FSDP1 flat shards: not tensors a plain model loads
        raise ValueError(
            f"the EMA state holds the {whose.get('engine')} shards of rank {whose.get('rank')} of "
            f"{whose.get('world_size')} only: call ema.save_ema_weights(path) on every rank of the run, which gathers "
            "them to rank 0"
        )
    full = {name: t.full_tensor() if is_dtensor(t) else t for name, t in weights.items()}
    return save_state_dict({key: full[name] for key, name in keys.items()}, path)


def ema_states_in_checkpoint(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The states of the EMA algorithms saved in a trainer checkpoint, in the trainer's order (not PostHocEMA's,
    whose averages are exported by ``emakit posthoc``)."""
    return [a for a in checkpoint.get("algorithms", []) if _is_ema_state(a)]


def _is_ema_state(value: object) -> bool:
    return isinstance(value, dict) and value.keys() >= _EMA_FIELDS


def ema_states_at(path: str | Path) -> list[dict[str, Any]]:
    """The EMA states a checkpoint holds, in the run's order (see the module for the formats read).

    ValueError names the path when it holds none, is of no format read here, or holds ZeRO-3 partitions of one rank
    (those are exported by ``ema.save_ema_weights`` in the run, which gathers them).
    """
    path = Path(path)
    if path.is_dir():
        states = _states_in_folder(path)
    elif path.suffix == ".ckpt":  # Lightning: EMACallback states under checkpoint["callbacks"]
        checkpoint = _load(path)
        callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
        states = [v["ema"] for v in callbacks.values() if isinstance(v, dict) and _is_ema_state(v.get("ema"))]
    else:
        checkpoint = _load(path)
        if isinstance(checkpoint, dict) and "format_version" in checkpoint:
            from emakit.trainer.checkpoint import load_checkpoint  # CRC-checked

            checkpoint = load_checkpoint(path)
            if any(isinstance(a, dict) and set(a) == {"per_rank_states"} for a in checkpoint.get("algorithms", [])):
                raise ValueError(
                    f"checkpoint {str(path)!r} holds an EMA split over ranks (shard_over_ranks=True): resume the run "
                    "on as many ranks and call ema.save_ema_weights(path) on every rank, which gathers it"
                )
            states = ema_states_in_checkpoint(checkpoint)
        else:
            states = [checkpoint] if _is_ema_state(checkpoint) else []
    for state in states:
        if state.get("partitioning"):
            raise ValueError(
                f"{str(path)!r} holds the EMA partitions of rank {state['partitioning'].get('rank')} of a "
                f"{state['partitioning'].get('engine')} run: export it in the run, ema.save_ema_weights(path) on "
                "every rank, which gathers them"
            )
    return states


def _load(path: Path) -> Any:
    """``torch.load`` with ``weights_only``: a file holding pickled objects is refused without running them."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it holds objects other than tensors and plain values (loading "
            f"it could run code): {str(error).splitlines()[0]}"
        ) from None
    except Exception as error:  # torch.load raises many types for foreign or damaged files
        raise ValueError(f"checkpoint {str(path)!r} is truncated, corrupt or not a torch.save file: {error}") from None


def _states_in_folder(path: Path) -> list[dict[str, Any]]:
    if (path / ".metadata").is_file():  # emakit's sharded (FSDP) checkpoint: DCP shards + trainer.pt
        return _sharded_states(path)
    if (path / HF_EMA_STATE_NAME).is_file():  # the Hugging Face callback
        state = _load(path / HF_EMA_STATE_NAME)
        return [state] if _is_ema_state(state) else []
    per_rank = sorted(path.glob("emakit_ema-rank*.pt"))  # the Hugging Face callback, one rank's data each
    if per_rank:
        state = _load(per_rank[0])
        return [state] if _is_ema_state(state) else []  # refused below, naming whose data it holds
    found = []  # accelerate's save_state: one custom_checkpoint_N.pkl per object registered for checkpointing
    for file in sorted(path.glob("custom_checkpoint_*.pkl"), key=lambda f: int(f.stem.rsplit("_", 1)[1])):
        state = _load(file)
        if _is_ema_state(state):
            found.append(state)
    return found


def _sharded_states(path: Path) -> list[dict[str, Any]]:
    """The EMA states of a sharded checkpoint folder, each shard read whole (DCP without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from emakit.trainer.checkpoint import load_checkpoint
    from emakit.trainer.sharded import PLAIN_FILE, marker_keys, merge_sharded

    plain = load_checkpoint(path / PLAIN_FILE)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    states = ema_states_in_checkpoint(plain)
    marked = marker_keys(states)
    tensors = {}
    for key in marked:
        spec = metadata[key]
        if not isinstance(spec, TensorStorageMetadata):
            raise ValueError(f"sharded checkpoint {str(path)!r}: {key!r} is not a tensor in its DCP metadata")
        tensors[key] = torch.empty(tuple(spec.size), dtype=spec.properties.dtype)  # whole: DCP fills every shard
    if tensors:
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return merge_sharded(states, tensors)  # only the EMAs' tensors are read


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint of a run with an EMA: emakit (.pt, .dcp), Lightning (.ckpt), "
        "Hugging Face (checkpoint-N/), accelerate (save_state folder), or torch.save(ema.state_dict())",
    )  # fmt: skip
    parser.add_argument("output", type=Path, help="the safetensors file to write")
    parser.add_argument("--index", type=int, default=0, help="which EMA, when the run had several (default 0)")


def run(args: argparse.Namespace) -> int:
    states = ema_states_at(args.checkpoint)  # ValueError names a refused, damaged or foreign checkpoint
    if not states:
        raise SystemExit(f"emakit export: checkpoint {str(args.checkpoint)!r} holds no EMA state")
    if not 0 <= args.index < len(states):
        raise SystemExit(f"emakit export: --index {args.index} is out of range: {len(states)} EMA(s) saved")
    path = save_ema_state(states[args.index], args.output)
    print(f"wrote {len(states[args.index]['state_dict_keys'])} EMA tensors to {path}")
    return 0
