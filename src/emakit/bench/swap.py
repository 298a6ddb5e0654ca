"""Swap time: ``ema_weights`` in and out, per mode of emakit's EMA, against one flat copy and torch_ema's swap.

All contenders are timed in one round-robin block (:func:`~emakit.bench.timing.time_round_robin`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from emakit.bench import targets
from emakit.bench.peers import MODES, Impl
from emakit.bench.timing import averaged_numel, time_round_robin

__all__ = ["bench_swap"]


def bench_swap(impls: dict[str, Impl], args: argparse.Namespace) -> dict[str, Any]:
    """Median time of a swap in and out, per mode of emakit's EMA, vs one flat copy of the weights and torch_ema's.

    Timed round-robin on the models the update benchmark left: ``with ema.ema_weights(model): pass``
    for ``EMA()`` (``default_s``) and ``EMA(flatten_model=True)`` (``flatten_model_s``); a flat
    ``copy_`` of as many elements (``copy_s``); ``with ema.average_parameters(): pass`` of torch_ema
    (store, copy_to, restore: ``torch_ema_s``, None when torch_ema does not import).
    """
    model = impls["emakit.EMA"].model
    numel = averaged_numel(model)
    source, target = torch.randn(numel, device=args.device), torch.empty(numel, device=args.device)

    def emakit_swap(impl: Impl) -> Callable[[], None]:
        def swap() -> None:
            with impl.handle.ema_weights(impl.model):
                pass

        return swap

    fns: dict[str, Callable[[], object]] = {
        "copy": lambda: target.copy_(source),
        "default": emakit_swap(impls["emakit.EMA"]),
        "flatten_model": emakit_swap(impls["emakit.EMA(flatten_model)"]),
    }
    if "torch_ema" in impls:
        torch_ema = impls["torch_ema"].handle

        def torch_ema_swap() -> None:
            with torch_ema.average_parameters():
                pass

        fns["torch_ema"] = torch_ema_swap
    times = time_round_robin(fns, args.repeats, args.warmup, args.device)
    peer = times.get("torch_ema")
    result: dict[str, Any] = {f"{name}_s": times.get(name) for name in ("copy", "torch_ema", *MODES)}
    result |= {
        "flatten_model_vs_copy": times["flatten_model"] / times["copy"],
        "default_vs_copy": times["default"] / times["copy"],
        "default_vs_torch_ema": times["default"] / peer if peer else None,
    }
    result["targets"] = targets.SWAP_FLATTEN.judge(result["flatten_model_vs_copy"]) | targets.SWAP_DEFAULT.judge(
        result["default_vs_torch_ema"]
    )
    return result
