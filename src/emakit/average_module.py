"""``ema.ema_model``: a module of the model's type holding a copy of the average, independent of the EMA.

What users of timm's ``ModelEmaV3.module`` and torch's ``AveragedModel.module`` do with it —
evaluate it, ``state_dict()`` it, move it, ``.half()`` it, fine-tune it — then never reaches the
average: the module owns its tensors. It costs a copy of the model (the average's dtype for the
averaged tensors, everything else copied as it is) while it is held. For a sharded (FSDP2) model it
is a plain, unsharded module, made from a weightless copy of the model's structure taken before
sharding and the gathered average.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from emakit.tracked import fill_tensors, is_dtensor

__all__ = ["average_module", "gathered_module"]


def _owned(model_tensor: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    value = average.detach().clone()
    return nn.Parameter(value, requires_grad=False) if isinstance(model_tensor, nn.Parameter) else value


def average_module(model: nn.Module, averages: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A deep copy of ``model`` whose tracked tensors are copies of their averages.

    ``averages`` holds ``(name, model tensor, tensor holding its average)``; the model's other tensors
    (those the EMA does not track) are copied as they are. Parameters holding an average do not
    require gradients (``requires_grad_(True)`` to fine-tune the copy).
    """
    memo: dict[int, object] = {id(tensor): _owned(tensor, holder) for _, tensor, holder in averages}
    return copy.deepcopy(model, memo)


def gathered_module(skeleton: nn.Module | None, averages: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module from ``skeleton`` (a weightless copy of a sharded model) holding the full ``averages``.

    Gathering DTensor shards is collective: every rank must call.
    """
    if skeleton is None:
        raise ValueError(
            "ema_model of an FSDP-sharded model needs a copy of its structure taken before sharding (FSDP "
            "refuses deepcopy): let emakit shard it (Trainer(parallelism='fsdp')) or call "
            "ema.remember_structure(model) before fully_shard; or use `with ema.ema_weights(model):`, "
            "ema.ema_state_dict() or ema.save_ema_weights(path)"
        )
    full = {name: t.full_tensor() if is_dtensor(t) else t.clone() for name, t in averages.items()}
    return fill_tensors(copy.deepcopy(skeleton), full)
