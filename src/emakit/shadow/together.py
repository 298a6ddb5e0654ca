"""Several averages of one model updated together: the groups laid out alike over a flat model buffer
(``flatten_model=True``) go through one compiled kernel that reads the weights once
(:func:`emakit.storage.fused.fused_lerp`); any other group updates as it would alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emakit.shadow.weights import ShadowWeights
from emakit.storage import Group
from emakit.storage.bound import BoundGroup
from emakit.storage.fused import fused_lerp

__all__ = ["update_together"]


def _flat_source(groups: Sequence[Group]) -> torch.Tensor | None:
    """The flat model buffer every group's average lines up with element for element, if there is one."""
    bound = next((g for g in groups if isinstance(g, BoundGroup)), None)
    if bound is None or bound.staging is not None or bound.kind == "copied" or bound.sharded:
        return None
    first = groups[0].ema_flat
    for group in groups:
        average = group.ema_flat
        if (
            (average.dtype, average.device, average.numel()) != (first.dtype, first.device, bound.model_flat.numel())
            or group.offsets != bound.offsets
            or len(group.tensors) != len(bound.tensors)
            or any(a is not b for a, b in zip(group.tensors, bound.tensors))
        ):
            return None
    return bound.model_flat


@torch.no_grad()
def update_together(shadows: Sequence[ShadowWeights], model: nn.Module, weights: Sequence[float]) -> None:
    """``shadow.update(model, weight)`` for every pair, reading each flat model buffer once where the layouts allow.

    Example::

        >>> update_together([ema_a, ema_b], model, [0.01, 0.001])   # as ema_a.update(model, 0.01); ema_b...
    """
    if any(shadow.async_update for shadow in shadows) or len(shadows) < 2:
        for shadow, weight in zip(shadows, weights):
            shadow.update(model, weight)
        return
    layouts = [shadow.groups_for_update(model) for shadow in shadows]
    if len({len(groups) for groups in layouts}) != 1:
        raise RuntimeError("update_together: the averages are laid out differently; they must follow one model")
    for groups in zip(*layouts):
        source = _flat_source(groups)
        if source is None:
            for group, weight in zip(groups, weights):
                group.update(weight)
        else:
            fused_lerp(source, [group.ema_flat for group in groups], weights)
