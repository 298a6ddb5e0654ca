"""The torchrun environment and the process group: ranks, world size, device, start (with a timeout) and teardown."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import weakref
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TORCH_VERSION",
    "barrier",
    "default_device",
    "initialize",
    "is_main",
    "local_rank",
    "rank",
    "timeout_seconds",
    "world_size",
]

_DEFAULT_TIMEOUT_S = 300.0
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])  # (major, minor)
_meshes: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # the DeviceMeshes _fully_shard made


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def world_size() -> int:
    """The number of processes: the process group's size, else ``WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global rank: the process group's, else ``RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, 0 when unset): the index of its GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this is rank 0, the process that prints, shows progress and writes files."""
    return rank() == 0


def timeout_seconds() -> float:
    """How long a collective may wait for the other ranks: ``EMAKIT_DIST_TIMEOUT`` seconds, default 300."""
    value = os.environ.get("EMAKIT_DIST_TIMEOUT")
    if value is None or value == "":
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"EMAKIT_DIST_TIMEOUT={value!r} must be a positive number of seconds")
    return seconds


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available (``cuda`` in one process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if world_size() > 1 else torch.device("cuda")


def initialize(device: torch.device) -> bool:
    """Start the default process group when ``WORLD_SIZE`` > 1 and none is running; True when this call started it.

    The backend is ``nccl`` for a CUDA ``device`` (which becomes this process's current device), ``gloo``
    otherwise; collectives time out after :func:`timeout_seconds`. The group is destroyed when the process exits.
    """
    if world_size() <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size()} but this torch build has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size()} but {missing} are not set: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node N script.py)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    """Destroy the process group while the interpreter is whole (at exit), so its backend's threads are joined.

    A gloo worker thread that finished a collective may still hold its tensors; releasing them takes the GIL, and a
    thread that waits for the GIL once the interpreter finalizes aborts the process ("terminate called without an
    active exception"). The backend joins its threads when the group is freed, which ``destroy_process_group`` does
    only if nothing else holds the group. Under FSDP2 two things do: sharded modules of finished runs (reference
    cycles, until a collection), and the device meshes (a mesh keeps its groups; DTensor's caches keep the mesh).
    """
    if not dist.is_initialized():
        return
    if TORCH_VERSION < (
        2,
        8,
    ):  # gloo's destructor holds the GIL while joining a worker that waits for it (fixed in 2.8)
        with contextlib.suppress(Exception):
            dist.barrier()  # every rank's last collective is finished before the group goes
    dist.destroy_process_group()
    gc.collect()
    for mesh in list(_meshes.values()):
        groups = getattr(mesh, "_pg_registry", None)  # the mesh's references to its groups (recent torch)
        if isinstance(groups, dict):
            groups.clear()
    _meshes.clear()


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
