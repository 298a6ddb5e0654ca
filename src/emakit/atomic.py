"""Atomic writes: a file or folder appears under its name whole, or not at all.

Every file emakit writes (trainer checkpoints, post-hoc snapshots, the Hugging Face callback's
state, exported weights) goes through :func:`atomic_write` or :func:`atomic_path`: the content is written to a hidden
temporary beside the target (same folder, so the rename cannot cross file systems), flushed and
``fsync``-ed, renamed over the target, and the folder is ``fsync``-ed so the rename itself
survives a crash. A crash at any point leaves either the old file or the new one, plus at most a
``.NAME.partial-PID`` leftover that :func:`remove_partial_files` cleans up.

Example::

    >>> import torch
    >>> with atomic_write("runs/state.pt") as file:   # doctest: +SKIP
    ...     torch.save({"step": 3}, file)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_path",
    "atomic_write",
    "fsync_folder",
    "partial_path",
    "remove_partial_files",
    "replace_folder",
]


def partial_path(path: str | os.PathLike) -> Path:
    """The hidden temporary that :func:`atomic_write` fills before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (for writers that take a file name, like safetensors'
    ``save_file``); on a clean exit it is synced and replaces ``path`` durably, on an exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
        with partial.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file open on a temporary beside ``path``; on a clean exit it replaces ``path`` durably.

    On an exception the temporary is removed and ``path`` is left as it was.
    """
    with atomic_path(path) as partial, partial.open("wb") as file:
        yield file


def replace_folder(filled: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Put the finished folder ``filled`` in place of ``path`` (removing an old one) and make it durable."""
    path = Path(path)
    for root, _, files in os.walk(filled):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(filled, path)
    fsync_folder(path.parent)
    return path


def remove_partial_files(folder: str | os.PathLike) -> None:
    """Delete what a write killed midway left in ``folder`` (never mistaken for a finished file, but it takes space)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(".*.partial*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
