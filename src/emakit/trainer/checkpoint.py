"""Checkpoint files: written atomically, read without running code.

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save``; it is
read with ``torch.load(weights_only=True)``, which refuses anything that would execute code
while unpickling. Writes are atomic (:mod:`emakit.atomic`), so a crash never leaves a partial file under a
checkpoint's name.
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from emakit.atomic import atomic_write, remove_partial_files

__all__ = [
    "FORMAT_VERSION",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_checkpoint",
    "remove_partial_files",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^ep(\d+)-ba(\d+)\.(pt|dcp)$")  # .dcp: the folder of a sharded (FSDP) checkpoint


def checkpoint_name(epoch: int, batch: int, sharded: bool = False) -> str:
    """The name of the checkpoint taken after ``epoch`` epochs and ``batch`` batches (a folder when ``sharded``)."""
    return f"ep{epoch}-ba{batch}.{'dcp' if sharded else 'pt'}"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see :func:`emakit.atomic.atomic_write`); returns the path."""
    with atomic_write(path) as file:
        torch.save({"format_version": FORMAT_VERSION, **state}, file)
    return Path(path)


def _check_integrity(path: Path) -> None:
    """Raise ValueError unless ``path`` is a zip archive whose every record matches its CRC-32.

    ``torch.save`` writes a zip with checksums but ``torch.load`` does not verify them: a
    flipped byte in tensor data would load silently.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt: {error}") from None
    if broken is not None:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: record {broken!r} fails its CRC-32 check")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing pickled code, corruption and unknown formats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    _check_integrity(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"checkpoint {str(path)!r} is corrupt: {error}") from None
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it holds objects other than tensors and plain values "
            f"(loading it could run code): {str(error).splitlines()[0]}"
        ) from None
    except Exception as error:  # torch.load raises many types on damaged input
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r}; this emakit reads version {FORMAT_VERSION}"
        )
    return state


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint: a file, or the folder of a sharded one."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest (fewest batches) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(2)), p)
        for p in folder.iterdir()
        if (m := _NAME.match(p.name)) and (p.is_file() if m.group(3) == "pt" else p.is_dir())
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint in ``folder`` taken after the most batches, or None."""
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None
