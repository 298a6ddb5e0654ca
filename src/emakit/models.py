"""Models the trainer can run: any ``nn.Module`` with ``loss(outputs, batch)``; :class:`Classifier` wraps a plain one.

The trainer's model protocol::

    outputs = model(batch)                      # forward on the whole batch
    loss = model.loss(outputs, batch)           # a scalar, the mean over the batch
    sums = model.metrics(outputs, batch)        # optional: {name: (total, count)}, summed over batches
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Wraps ``module`` for ``(inputs, targets)`` batches, with loss and accuracy.

    Example::

        >>> model = Classifier(nn.Linear(4, 3))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> outputs = model(batch)
        >>> model.loss(outputs, batch).shape
        torch.Size([])
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"Classifier wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, _ = batch
        return self.module(inputs)

    def loss(self, outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(outputs, batch[1])

    def metrics(
        self, outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, int]]:
        targets = batch[1]
        correct = (outputs.argmax(dim=-1) == targets).sum()
        return {"accuracy": (correct, targets.shape[0])}
