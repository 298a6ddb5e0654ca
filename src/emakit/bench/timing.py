"""Timing: a round-robin timer (each contender alternating call by call with the others), the rooflines, sizes.

Each implementation is timed in its own block, alternating call by call with the roofline (roofline, update,
roofline, update, ...) after a warm-up, with the garbage collector paused; each gets the median of its calls and
its ratio uses the roofline of its own block. A slow drift of a shared machine then hits both alike, and no
implementation runs while another is timed: some peers re-register a buffer on every call (``self.step += 1`` on a
module), which would otherwise count against implementations that watch for module changes. On CUDA each call is
synchronised on both sides, so the time includes the queued kernels and the Python overhead.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from emakit.bench.peers import SMOOTHING
from emakit.tracked import is_averaged, tracked_tensors

__all__ = ["averaged_numel", "model_bytes", "rooflines", "time_round_robin"]


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call of ``fn``; on CUDA synchronised on both sides."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time_once(fn: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return time_once


def time_round_robin(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (one call each per round) after a warm-up."""
    time_once = _timer(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(time_once(fn))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(times) for name, times in samples.items()}


def rooflines(numel: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The fastest an update of ``numel`` fp32 elements can be: one flat ``lerp_`` (reads 2N, writes N).

    On CUDA also a device-to-device copy of 1.5N elements: as many bytes moved as by the lerp.
    """
    ema_flat, param_flat = torch.randn(numel, device=device), torch.randn(numel, device=device)
    fns: dict[str, Callable[[], object]] = {"lerp": lambda: ema_flat.lerp_(param_flat, 1.0 - SMOOTHING)}
    if device.type == "cuda":
        source = torch.randn((3 * numel + 1) // 2, device=device)
        target = torch.empty_like(source)
        fns["copy"] = lambda: target.copy_(source)
    return fns


def averaged_numel(model: nn.Module) -> int:
    """Elements an EMA of ``model`` averages: its floating-point parameters and buffers."""
    return sum(t.numel() for _, t in tracked_tensors(model) if is_averaged(t))


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for _, t in tracked_tensors(model))
