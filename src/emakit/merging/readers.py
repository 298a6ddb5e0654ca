"""The model weights inside a checkpoint, whichever trainer wrote it, read one tensor at a time.

:func:`open_checkpoint` recognises what a path holds and gives a :class:`Checkpoint`: the names, shapes and dtypes
of the model's tensors (read from headers, without loading data), the training step when the checkpoint says it,
and a way to read one tensor at a time (safetensors reads that tensor only; ``torch.load`` files are memory-mapped).

==============================  ========================================================  =========================
path                            weights                                                   step
==============================  ========================================================  =========================
``*.safetensors``               the file                                                  --
``*.bin`` / ``*.pt`` (a dict    the dict of tensors                                       --
of tensors)
emakit ``Trainer`` ``*.pt``     ``checkpoint["model"]``                                   ``timestamp["batch"]``
Lightning ``*.ckpt``            ``checkpoint["state_dict"]`` (the LightningModule's keys)  ``global_step``
Hugging Face ``checkpoint-N/``  ``model.safetensors`` (or its sharded index), or          ``trainer_state.json``'s
/ ``save_pretrained`` folder    ``pytorch_model.bin``                                     ``global_step``
accelerate ``save_state``       ``model.safetensors`` or ``pytorch_model.bin`` (the       --
folder                          first model prepared)
DCP folder (``.metadata``)      every tensor under ``model/`` (emakit's sharded Trainer)  emakit's ``trainer.pt``
                                or ``state_dict.`` (Lightning), else all
==============================  ========================================================  =========================

``torch.load`` runs with ``weights_only=True``: a checkpoint holding other objects than tensors and plain values is
refused (unpickling it could run code) unless the caller trusts it (``trust=True``, ``--trust-pickle``).

Example::

    >>> checkpoint = open_checkpoint("runs/lightning/epoch=2-step=300.ckpt")
    >>> checkpoint.format, checkpoint.step, len(checkpoint.specs)
    ('lightning', 300, 12)
    >>> weight = checkpoint.read("model.0.weight")
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpoint", "TensorSpec", "open_checkpoint"]

HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype, known before its data is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """The model weights of one checkpoint: ``specs`` (name -> shape and dtype), ``step`` (None when the checkpoint
    does not say it), ``read(name)`` one tensor, ``folder`` the Hugging Face folder it came from (for its config)."""

    path: Path
    format: str
    step: int | None
    specs: dict[str, TensorSpec]
    read: Callable[[str], torch.Tensor] = field(repr=False)
    folder: Path | None = None


def open_checkpoint(path: str | os.PathLike, trust: bool = False) -> Checkpoint:
    """What ``path`` holds, as a :class:`Checkpoint` (see the module's table); ValueError naming the path when it is
    none of those, is damaged, or holds pickled objects and ``trust`` is False."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        return _open_folder(path, trust)
    if path.suffix == ".safetensors":
        return _open_safetensors(path, "safetensors", None)
    return _open_torch_file(path, trust)


def _open_safetensors(path: Path, format: str, step: int | None, folder: Path | None = None) -> Checkpoint:
    return _open_safetensors_files([path], path, format, step, folder)


def _open_safetensors_files(
    files: list[Path], path: Path, format: str, step: int | None, folder: Path | None
) -> Checkpoint:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    specs: dict[str, TensorSpec] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as opened:
                for name in opened.keys():  # noqa: SIM118 (safe_open is no mapping)
                    piece = opened.get_slice(name)
                    specs[name] = TensorSpec(tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])
                    where[name] = file
        except Exception as error:  # safetensors raises its own types for damaged files
            raise ValueError(f"checkpoint {str(file)!r} is not a readable safetensors file: {error}") from None

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as opened:
            return opened.get_tensor(name)

    return Checkpoint(path, format, step, specs, read, folder)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _load(path: Path, trust: bool) -> Any:
    """``torch.load`` of ``path``, memory-mapped (tensors read when touched), ``weights_only`` unless trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"checkpoint {str(path)!r} is damaged: {error}") from None
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain values ({str(error).splitlines()[0]}"
            "): loading it could run code. If you trust the file, pass trust=True (--trust-pickle)"
        ) from None
    except RuntimeError as error:
        raise ValueError(f"checkpoint {str(path)!r} is not a torch.save file or is damaged: {error}") from None


def _of_tensors(state: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r}: {what} is not a dict of tensors")
    return state


def _from_tensors(
    path: Path, format: str, step: int | None, tensors: dict[str, torch.Tensor], folder: Path | None = None
) -> Checkpoint:
    specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}
    return Checkpoint(path, format, step, specs, tensors.__getitem__, folder)


def _open_torch_file(path: Path, trust: bool) -> Checkpoint:
    state = _load(path, trust)
    if isinstance(state, dict) and "format_version" in state and "model" in state and "timestamp" in state:
        return _from_tensors(
            path, "emakit", int(state["timestamp"]["batch"]), _of_tensors(state["model"], path, "'model'")
        )
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        return _from_tensors(
            path, "lightning", int(state.get("global_step", 0)), _of_tensors(state["state_dict"], path, "'state_dict'")
        )
    return _from_tensors(path, "torch", None, _of_tensors(state, path, "the file"))


def _hf_step(folder: Path) -> int | None:
    trainer_state = folder / "trainer_state.json"
    if not trainer_state.is_file():
        return None
    return int(json.loads(trainer_state.read_text())["global_step"])


def _open_folder(path: Path, trust: bool) -> Checkpoint:
    if (path / ".metadata").is_file():
        return _open_dcp(path)
    format = (
        "hugging-face" if (path / "config.json").is_file() or (path / "trainer_state.json").is_file() else "accelerate"
    )
    step = _hf_step(path)
    folder = path if (path / "config.json").is_file() else None
    if (path / HF_SAFETENSORS).is_file():
        return _open_safetensors(path / HF_SAFETENSORS, format, step, folder)
    if (path / HF_SAFETENSORS_INDEX).is_file():
        index = json.loads((path / HF_SAFETENSORS_INDEX).read_text())["weight_map"]
        files = [path / name for name in sorted(set(index.values()))]
        return _open_safetensors_files(files, path, format, step, folder)
    if (path / HF_BIN).is_file():
        return _from_tensors(path, format, step, _of_tensors(_load(path / HF_BIN, trust), path, HF_BIN), folder)
    if (path / HF_BIN_INDEX).is_file():
        index = json.loads((path / HF_BIN_INDEX).read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(index.values())):
            tensors.update(_of_tensors(_load(path / name, trust), path, name))
        return _from_tensors(path, format, step, tensors, folder)
    raise ValueError(
        f"checkpoint folder {str(path)!r} holds no model weights emakit reads ({HF_SAFETENSORS}, its index, "
        f"{HF_BIN}, or a torch.distributed.checkpoint .metadata)"
    )


def _open_dcp(path: Path) -> Checkpoint:
    """A ``torch.distributed.checkpoint`` folder, read without a process group, one tensor at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    tensors = {
        key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)
    }
    step, plain = None, {}
    for prefix in ("model/", "state_dict."):  # emakit's sharded Trainer; Lightning's ModelParallelStrategy
        chosen = {key[len(prefix) :]: key for key in tensors if key.startswith(prefix)}
        if chosen:
            break
    else:
        chosen = {key: key for key in tensors}
    if (path / "trainer.pt").is_file():  # emakit: the clock, and the model's unsharded tensors (buffers)
        from emakit.trainer.checkpoint import load_checkpoint

        saved = load_checkpoint(path / "trainer.pt")
        step = int(saved["timestamp"]["batch"])
        plain = {name: value for name, value in saved["model"].items() if isinstance(value, torch.Tensor)}
    specs = {name: TensorSpec(tuple(tensors[key].size), tensors[key].properties.dtype) for name, key in chosen.items()}
    specs |= {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in plain.items()}

    def read(name: str) -> torch.Tensor:
        if name in plain:
            return plain[name]
        spec = specs[name]
        holder = {chosen[name]: torch.empty(spec.shape, dtype=spec.dtype)}
        dcp.load(holder, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        return holder[chosen[name]]

    return Checkpoint(path, "dcp", step, specs, read)
