"""The measurements: update time against the roofline and peers, swap time, eval memory, trainer overhead.

Timing: each implementation is timed in its own block, alternating call by call with the
roofline (roofline, update, roofline, update, ...) after a warm-up, with the garbage collector
paused; each gets the median of its calls and its ratio uses the roofline of its own block. A
slow drift of a shared machine then hits both alike, and no implementation runs while another
is timed: some peers re-register a buffer on every call (``self.step += 1`` on a module), which
would otherwise count against implementations that watch for module changes. On CUDA each call
is synchronised on both sides, so the time includes the queued kernels and the Python overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Callback, Classifier, Trainer
from emakit.bench.peers import IMPLEMENTATIONS, SMOOTHING, Impl, check_closed_form, import_error
from emakit.tracked import is_averaged, tracked_tensors

__all__ = [
    "averaged_numel",
    "bench_eval_memory",
    "bench_swap",
    "bench_trainer",
    "bench_updates",
    "live_tensor_bytes",
    "model_bytes",
    "rooflines",
    "time_round_robin",
]


# ----------------------------------------------------------------------------- timing
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
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
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


# ------------------------------------------------------------------------ update speed
def _ready_implementations(template: nn.Module) -> tuple[list[Impl], dict[str, str]]:
    """Each importable implementation on its own copy of ``template``, started and checked; the skipped."""
    impls, skipped = [], {}
    for name, _, module, factory in IMPLEMENTATIONS:
        reason = import_error(module)
        if reason is not None:
            skipped[name] = reason
            continue
        impl = factory(copy.deepcopy(template))
        impl.step()  # starts the average at the weights (emakit.EMA: binds the model into its flat buffer)
        check_closed_form(impl)
        impls.append(impl)
    return impls, skipped


def bench_updates(template: nn.Module, args: argparse.Namespace) -> tuple[dict[str, Any], Impl]:
    """Median update time of every implementation on ``template``, with ratios; and emakit's ``EMA``.

    Per implementation: ``roofline_ratio = roofline_s / time_s``, the roofline timed in its own
    block (on CUDA also ``copy_roofline_ratio``); ``speedup_vs[other] = other's time_s / time_s``.
    """
    impls, skipped = _ready_implementations(template)
    roof = rooflines(averaged_numel(template), args.device)
    rows: dict[str, dict[str, Any]] = {}
    for impl in impls:
        times = time_round_robin(roof | {"update": impl.step}, args.repeats, args.warmup, args.device)
        t = times["update"]
        rows[impl.name] = {"time_s": t, "roofline_s": times["lerp"], "roofline_ratio": times["lerp"] / t}
        if "copy" in times:
            rows[impl.name] |= {"copy_roofline_s": times["copy"], "copy_roofline_ratio": times["copy"] / t}
    for name, row in rows.items():
        row["speedup_vs"] = {other: rows[other]["time_s"] / row["time_s"] for other in rows if other != name}
    roofline = {"lerp_s": statistics.median(row["roofline_s"] for row in rows.values())}
    if "copy" in roof:
        roofline["copy_s"] = statistics.median(row["copy_roofline_s"] for row in rows.values())
    result = {
        "tensors": sum(1 for _ in tracked_tensors(template)),
        "elements": averaged_numel(template),
        "roofline": roofline,  # medians over the blocks, for display
        "implementations": rows,
        "skipped": skipped,
    }
    return result, next(impl for impl in impls if impl.name == "emakit.EMA")


def bench_swap(emakit: Impl, args: argparse.Namespace) -> dict[str, float]:
    """Median time of ``with ema.ema_weights(model): pass`` (in and out) vs one flat copy of the weights."""
    ema, model = emakit.handle, emakit.model
    numel = averaged_numel(model)
    source, target = torch.randn(numel, device=args.device), torch.empty(numel, device=args.device)

    def swap() -> None:
        with ema.ema_weights(model):
            pass

    times = time_round_robin(
        {"copy": lambda: target.copy_(source), "swap": swap}, args.repeats, args.warmup, args.device
    )
    return {"swap_s": times["swap"], "copy_s": times["copy"], "ratio": times["swap"] / times["copy"]}


# ------------------------------------------------------------------------------ memory
def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every distinct tensor storage alive on ``device``'s type: exact on CUDA, a census on CPU.

    CPU has no allocator statistics, so this walks the garbage collector's objects (every Python
    tensor is tracked there) and counts each distinct storage once. Memory held only by C++ and
    temporaries freed before the census are not seen: it measures what stays allocated.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == device.type:
            with contextlib.suppress(RuntimeError, NotImplementedError):
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    storages.pop(0, None)
    return sum(storages.values())


def bench_eval_memory(template: nn.Module, device: torch.device) -> dict[str, float]:
    """Tensor bytes alive in ``ema.ema_weights(model)`` minus those before the EMA existed, vs the model's.

    The difference is all the EMA holds during evaluation: its average, the training weights
    parked by the swap, any buffer left from binding the model. On CUDA also the peak during
    the swap in and out (``peak_extra_bytes``).
    """
    model = copy.deepcopy(template)
    before = live_tensor_bytes(device)
    ema = EMA(smoothing=SMOOTHING)
    ema.update(model)
    ema.update(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with ema.ema_weights(model):
        during = live_tensor_bytes(device)
    result: dict[str, float] = {"model_bytes": model_bytes(model), "extra_bytes": during - before}
    if device.type == "cuda":
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
    result["ratio"] = result["extra_bytes"] / result["model_bytes"]
    return result


# ----------------------------------------------------------------------------- trainer
class _EvalMemory(Callback):
    """Live tensor bytes when made (before the trainer and its EMA exist) and at the first evaluation batch."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.at_start, self.at_eval = device, live_tensor_bytes(device), None

    def eval_batch_end(self, state: Any, logger: Any) -> None:
        if self.at_eval is None:
            self.at_eval = live_tensor_bytes(self.device)


class _TimedEMA(EMA):
    """The EMA algorithm, also summing the wall time spent in its event handlers (updates and swaps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def apply(self, event: Any, state: Any, logger: Any) -> None:
        start = time.perf_counter()
        super().apply(event, state, logger)
        self.seconds += time.perf_counter() - start


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _train(
    data: TensorDataset, batches: int, with_ema: bool, device: torch.device, eval_memory: _EvalMemory | None = None
) -> tuple[float, Trainer]:
    """Wall seconds of ``Trainer.fit`` of ``batches`` batches of a small CNN, with EMA every batch or not."""
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(_small_cnn()),
        train_dataloader=DataLoader(data, batch_size=32),
        eval_dataloader=DataLoader(TensorDataset(*data[:64]), batch_size=32) if eval_memory else None,
        max_duration=f"{batches}ba",
        algorithms=[_TimedEMA(half_life="50ba")] if with_ema else [],
        callbacks=[eval_memory] if eval_memory else [],
        device=device,
        seed=0,
        progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start, trainer


def _trainer_eval_memory(data: TensorDataset, device: torch.device) -> dict[str, float]:
    """Growth of live tensor bytes from before the trainer to evaluation, with EMA minus without, vs model bytes."""
    growth = {}
    for with_ema in (False, True):
        probe = _EvalMemory(device)
        _, trainer = _train(data, 3, with_ema, device, eval_memory=probe)
        growth[with_ema] = probe.at_eval - probe.at_start
    extra, size = growth[True] - growth[False], model_bytes(trainer.state.model)
    return {"eval_model_bytes": size, "eval_extra_bytes": extra, "eval_memory_ratio": extra / size}


def bench_trainer(args: argparse.Namespace) -> dict[str, float]:
    """Trainer wall time with ``EMA(half_life="50ba")`` every batch over without; alternated, median ratio.

    Also the Trainer's extra tensor bytes during evaluation with EMA over a run without, vs the model's.
    """
    batches, pairs, side = (4, 1, 8) if args.quick else (150, max(3, args.repeats // 6), 32)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batches * 32, 3, side, side, generator=generator),
        torch.randint(0, 10, (batches * 32,), generator=generator),
    )
    _train(data, min(batches, 10), True, args.device)  # warm-up
    with_ema, without, ratios, inside = [], [], [], []
    for pair in range(pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        runs = {flag: _train(data, batches, flag, args.device) for flag in order}
        with_ema.append(runs[True][0])
        without.append(runs[False][0])
        ratios.append(runs[True][0] / runs[False][0])
        inside.append(runs[True][1].engine.algorithms[0].seconds / runs[True][0])
    return {
        "batches": batches,
        "pairs": pairs,
        "with_ema_s": statistics.median(with_ema),
        "without_ema_s": statistics.median(without),
        "ratio": statistics.median(ratios),
        "ema_share": statistics.median(inside),
        **_trainer_eval_memory(data, args.device),
    }
