"""Several averages of one flat model buffer, updated by one compiled kernel that reads the buffer once.

Each average of an EMA reads the weights itself: ``k`` averages cost ``k`` passes over them, each reading the model
and reading and writing the average (``3k`` memory passes). Under ``flatten_model=True`` the model of a (device,
dtype) lives in one flat buffer, and every average of the same layout has the same offsets in its own flat buffer;
one kernel can then read the model once and move every average (``2k + 1`` passes)::

    for each element i:   x = model_flat[i];   average_j[i] += w_j * (x - average_j[i])   for every j

The kernel is ``torch.compile``'d once per device and number of averages (dynamic shapes: any size), with the
weights passed as a tensor so that new weights (warmup, schedules, uniform averages) do not recompile. It is opt-in
(``EMA(compile_update=True)``): the first update compiles it (seconds, and a C++ compiler on the CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["fused_lerp"]

_kernels: dict[int, Callable[..., None]] = {}
_failed: list[BaseException] = []  # the compile error, once: every later call runs eagerly


def _lerp_all(model_flat: torch.Tensor, averages: list[torch.Tensor], weights: torch.Tensor) -> None:
    for index, average in enumerate(averages):
        average.lerp_(model_flat.to(average.dtype), weights[index])


def fused_lerp(model_flat: torch.Tensor, averages: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    """``average_j += w_j * (model_flat - average_j)`` for every ``j``, reading ``model_flat`` once (compiled).

    ``averages`` are flat buffers of ``model_flat``'s size, of one dtype (the model's, or wider). If compiling fails
    (no C++ compiler, an unsupported device), warns once and runs one ``lerp_`` per average from then on.

    Example::

        >>> fused_lerp(model_flat, [ema_a, ema_b], [0.01, 0.001])
    """
    averages = list(averages)
    weight_tensor = torch.tensor(list(weights), dtype=averages[0].dtype, device=averages[0].device)
    if not _failed:
        try:
            kernel = _kernels.get(len(averages))
            if kernel is None:
                kernel = _kernels[len(averages)] = torch.compile(_lerp_all, dynamic=True, fullgraph=True)
            kernel(model_flat, averages, weight_tensor)
            return
        except Exception as error:  # any compile failure: fall back, said once
            _failed.append(error)
            warnings.warn(
                f"EMA(compile_update=True): torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                "updating each average with its own pass instead",
                RuntimeWarning,
                stacklevel=3,
            )
    _lerp_all(model_flat, averages, weight_tensor)
