"""The arguments of :class:`~emakit.Trainer`: each checked, and its default filled in, before the run changes anything.

Every check raises ``ValueError`` naming the bad value and what is allowed. The Trainer calls them in the
order of its signature, so the first bad argument is the one reported. Example::

    >>> check_max_duration("10ep")
    Time(10, TimeUnit.EPOCH)
    >>> check_precision("bf16")
    Traceback (most recent call last):
    ValueError: precision='bf16' is not supported: use one of ('fp32', 'amp_bf16', 'amp_fp16')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from emakit import distributed
from emakit.time import Time, TimeUnit, as_interval, as_time
from emakit.tracked import unwrap

__all__ = [
    "PRECISIONS",
    "batches_per_epoch",
    "check_autoresume",
    "check_checkpoints_to_keep",
    "check_interval",
    "check_max_duration",
    "check_model",
    "check_precision",
    "check_seed",
    "check_train_dataloader",
    "listed",
    "resolve_device",
    "resolve_seed",
]

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


def check_model(model: Any) -> None:
    """``model`` must be an ``nn.Module`` with ``loss(outputs, batch)`` (a wrapped one: its inner module)."""
    if not isinstance(model, nn.Module) or not callable(getattr(unwrap(model), "loss", None)):
        raise ValueError(
            f"model must be an nn.Module with a loss(outputs, batch) method, got {type(model).__name__}; "
            "wrap a plain module as emakit.Classifier(module)"
        )


def check_train_dataloader(train_dataloader: Any) -> None:
    if not isinstance(train_dataloader, Iterable):
        raise ValueError(f"train_dataloader must be iterable, got {type(train_dataloader).__name__}")


def check_max_duration(max_duration: str | int | Time) -> Time:
    """``max_duration`` as a :class:`~emakit.Time` > 0 in ``ba``, ``ep``, ``sp`` or ``tok`` (an int: epochs)."""
    duration = as_time(max_duration, name="max_duration", int_unit=TimeUnit.EPOCH)
    if duration.unit is TimeUnit.DURATION or duration.value <= 0:
        raise ValueError(f"max_duration={max_duration!r} must be > 0 in 'ba', 'ep', 'sp' or 'tok'")
    return duration


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported: use one of {PRECISIONS}")


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed={seed!r} must be a non-negative int")


def check_checkpoints_to_keep(keep: int) -> int:
    """``save_num_checkpoints_to_keep``: a positive int, or -1 to keep every checkpoint."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep == 0 or keep < -1:
        raise ValueError(f"save_num_checkpoints_to_keep={keep!r} must be a positive int, or -1 to keep all")
    return keep


def check_autoresume(autoresume: bool, save_folder: str | os.PathLike | None) -> None:
    if autoresume and save_folder is None:
        raise ValueError("autoresume=True needs a save_folder to look for checkpoints in")


def check_interval(interval: str | int | Time, name: str) -> Time:
    """``eval_interval`` or ``save_interval`` as a :class:`~emakit.Time` (an int: epochs)."""
    return as_interval(interval, name=name, int_unit=TimeUnit.EPOCH, examples=("1ep", "100ba"))


def batches_per_epoch(train_dataloader: Iterable) -> int | None:
    """``len(train_dataloader)``, or None when it has no length; a loader of no batches is refused."""
    try:
        batches = len(train_dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None
    if batches == 0:
        raise ValueError("train_dataloader yields no batches")
    return batches


def resolve_device(device: str | torch.device | None, fsdp: bool) -> torch.device:
    """``device`` as a ``torch.device``; default CUDA when available, else the CPU.

    Under torchrun a bare ``"cuda"`` is this process's GPU, ``cuda:LOCAL_RANK``; with FSDP the device must be one
    FSDP runs on (:func:`emakit.distributed.check_fsdp_device`).
    """
    try:
        device = torch.device(device) if device is not None else distributed.default_device()
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    if fsdp:
        distributed.check_fsdp_device(device)
    return device


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a random one when None; under torchrun rank 0's on every rank (collective)."""
    return distributed.from_rank0(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


def listed(items: Any | Sequence[Any] | None, one: type | None = None) -> list[Any]:
    """``optimizers`` or ``schedulers`` as a list: None is empty, a single one (an instance of ``one``, or
    anything but a list or tuple when ``one`` is None) a list of it."""
    if items is None:
        return []
    if (one is not None and isinstance(items, one)) or (one is None and not isinstance(items, (list, tuple))):
        return [items]
    return list(items)
