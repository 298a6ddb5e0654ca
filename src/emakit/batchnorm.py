"""BatchNorm statistics for averaged weights: an average of parameters needs statistics of its own.

The running mean and variance a BatchNorm layer keeps were measured with the training weights
of each step; the averaged weights never produced them. :func:`update_bn` measures them again:
every BatchNorm layer's statistics are reset and set to the *cumulative* average over one pass
of ``loader`` (``momentum=None``), as ``torch.optim.swa_utils.update_bn`` does::

    running_mean = mean over batches of the batch means,  running_var likewise (unbiased)

:meth:`emakit.EMA.update_bn` does this for the average, leaving the training weights' statistics
and the average's parameters as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from emakit.tracked import unwrap

__all__ = ["running_statistics", "update_bn"]

_NONE = object()


def _first_element(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _batchnorm_layers(model: nn.Module) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            yield name, module


def running_statistics(model: nn.Module) -> list[str]:
    """The ``state_dict`` names of the running statistics :func:`update_bn` recomputes (and their batch counts)."""
    return [
        f"{name}{'.' if name else ''}{key}"
        for name, layer in _batchnorm_layers(unwrap(model))
        for key in ("running_mean", "running_var", "num_batches_tracked")
        if getattr(layer, key, None) is not None
    ]


@torch.no_grad()
def update_bn(
    loader: Iterable,
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    inputs: Callable[[Any], Any] = _first_element,
) -> None:
    """Recompute the running statistics of every BatchNorm layer of ``model`` over one pass of ``loader``.

    Args:
        loader: batches; ``inputs(batch)`` is what ``model`` is called with.
        model: changed in place: its BatchNorm layers' running statistics (and batch counts) only.
        device: where to move the inputs (tensors, or lists/tuples/dicts of them); default: leave them.
        inputs: the model's input from a batch; default the first element of a tuple/list batch, else
            the batch (``torch.optim.swa_utils.update_bn``'s convention). For an emakit ``Classifier``,
            which takes the whole ``(x, y)`` batch, pass ``inputs=lambda batch: batch``.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> update_bn([(torch.randn(8, 3), None)], net)    # running stats = that batch's statistics
    """
    layers = [layer for _, layer in _batchnorm_layers(model)]
    if not layers:
        return
    batches = iter(loader)
    first = next(batches, _NONE)
    if first is _NONE:
        raise ValueError("update_bn: the loader yielded no batches; the statistics are left as they were")
    momenta = {layer: layer.momentum for layer in layers}
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the pass
    model.train()
    try:
        for batch in itertools.chain([first], batches):
            x = inputs(batch)
            model(_to(x, device) if device is not None else x)
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        model.train(was_training)


def _to(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
