"""Evaluation sums: loss and the model's metrics over a dataloader, reduced over all ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from emakit import distributed
from emakit.tracked import unwrap
from emakit.trainer.batches import batch_size, to_device

__all__ = ["fsdp_eval_forwards", "sum_metrics"]


def sum_metrics(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    after_batch: Callable[[Any, Any], None],
    min_forwards: int = 0,
) -> dict[str, list[float]]:
    """``{name: [total, count]}`` of the loss and ``model.metrics`` over ``dataloader``, summed over all ranks.

    The loss total is ``loss * batch size`` per batch, so ``total / count`` is the per-sample mean.
    ``after_batch(batch, outputs)`` runs after each batch. With ``min_forwards`` the model runs that many
    forwards at least (extra ones on the last batch, results unused): FSDP needs every rank in every forward.
    """
    forward = distributed.forward_module(model)  # not through DDP: ranks may run different numbers of batches
    module = unwrap(model)
    metrics = getattr(module, "metrics", None)
    totals: dict[str, list[float]] = {}
    batch, forwards = None, 0
    for batch in dataloader:
        batch = to_device(batch, device)
        with autocast():
            outputs = forward(batch)
            count = batch_size(batch)
            sums = {"loss": (module.loss(outputs, batch) * count, count)}
            if callable(metrics):
                sums.update(metrics(outputs, batch))
        for name, (total, n) in sums.items():
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += int(n)
        after_batch(batch, outputs)
        forwards += 1
    for _ in range(min_forwards - forwards):
        with autocast():
            forward(batch)
    totals = distributed.all_reduce_sums(totals, device)
    if not totals:
        raise ValueError("the eval dataloader yielded no batches")
    return totals


def fsdp_eval_forwards(dataloader: Iterable, device: torch.device) -> int:
    """How many eval forwards every rank runs under FSDP: the most batches any rank has."""
    try:
        batches = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"with FSDP the eval dataloader needs a len() (every rank must run as many forwards), "
            f"got a {type(dataloader).__name__}"
        ) from None
    forwards = distributed.max_over_ranks(batches, device)
    if batches == 0 and forwards > 0:
        raise ValueError(
            f"rank {distributed.rank()} has no eval batches while others have {forwards}: with FSDP every "
            "rank needs at least one (give the eval set at least as many samples as there are ranks)"
        )
    return forwards
