"""``ema.ema_model``: a module of the model's type whose tensors hold the average, with no copy of the weights.

The module is a deep copy of the model's structure whose parameters and buffers are the
average's own tensors, so it follows every update. While the average sits in the model's
memory (an exchanging swap) its tensors point there; after a re-layout they point at the new
average. For a sharded (FSDP2) model, whose structure cannot be deep-copied once sharded, a
plain module is filled with the gathered average instead, at each access.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from emakit.tracked import fill_tensors

__all__ = ["AverageModule", "gathered_module"]


class AverageModule:
    """Keeps the one module of the model's type that holds the average, and points it at the average's holders."""

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self._tensors: dict[str, torch.Tensor] = {}  # by tracked name: the module's own tensor objects

    def get(
        self,
        model: nn.Module,
        averages: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
        shared: Iterable[torch.Tensor] = (),
    ) -> nn.Module:
        """The module, built on first use from ``model`` and ``(name, model tensor, holder of its average)``.

        Tensors in ``shared`` (those the EMA does not track: a frozen base) are the model's own in it, not copies.
        """
        if self.module is None:
            memo: dict[int, object] = {id(t): t for t in shared}
            self._tensors = {}
            for name, tensor, holder in averages:
                held = nn.Parameter(holder, requires_grad=False) if isinstance(tensor, nn.Parameter) else holder
                memo[id(tensor)] = self._tensors[name] = held
            self.module = copy.deepcopy(model, memo)
        return self.module

    def repoint(self, holders: dict[str, torch.Tensor]) -> None:
        """Point the module's tensors at ``holders`` (by name); forget the module when names or shapes changed."""
        if self.module is None:
            return
        if holders.keys() != self._tensors.keys() or any(t.shape != holders[n].shape for n, t in self._tensors.items()):
            self.module = None  # the model changed: the next ema_model is a new module
            return
        for name, held in self._tensors.items():
            held.data = holders[name]


def gathered_module(skeleton: nn.Module | None, averages: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module from ``skeleton`` (a weightless copy of a sharded model) holding the full ``averages``.

    Gathering DTensor shards is collective: every rank must call.
    """
    if skeleton is None:
        raise ValueError(
            "ema_model of an FSDP-sharded model needs a copy of its structure taken before sharding (FSDP "
            "refuses deepcopy): let emakit shard it (Trainer(parallelism='fsdp')) or call "
            "ema.remember_structure(model) before fully_shard; or use `with ema.ema_weights(model):` "
            "or ema.save_ema_weights(path)"
        )
    full = {name: t.full_tensor() if isinstance(t, DTensor) else t.clone() for name, t in averages.items()}
    return fill_tensors(copy.deepcopy(skeleton), full)
