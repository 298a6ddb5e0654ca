"""The measurements: update time against the roofline and peers, swap time, memory, trainer overhead.

Timing: each implementation is timed in its own block, alternating call by call with the
roofline (roofline, update, roofline, update, ...) after a warm-up, with the garbage collector
paused; each gets the median of its calls and its ratio uses the roofline of its own block. A
slow drift of a shared machine then hits both alike, and no implementation runs while another
is timed: some peers re-register a buffer on every call (``self.step += 1`` on a module), which
would otherwise count against implementations that watch for module changes. On CUDA each call
is synchronised on both sides, so the time includes the queued kernels and the Python overhead.
Swaps are timed the same way, all contenders in one round-robin block.

Memory: during a Trainer evaluation, from the profiler's allocation and free events (every
tensor allocation, also a temporary freed before anything could look at it); for attaching an
EMA, from the peak memory of a fresh process (resident set on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, Trainer
from emakit.algorithms import EMAAlgorithm
from emakit.bench import targets
from emakit.bench.peers import IMPLEMENTATIONS, SMOOTHING, Impl, check_closed_form, import_error, is_peer
from emakit.tracked import is_averaged, tracked_tensors

__all__ = [
    "EVAL_WINDOW",
    "MODES",
    "attach_peaks",
    "averaged_numel",
    "bench_attach_memory",
    "bench_eval_memory",
    "bench_swap",
    "bench_trainer",
    "bench_updates",
    "model_bytes",
    "peak_in_window",
    "rooflines",
    "time_round_robin",
]

# emakit's EMA modes compared by the swap and memory benchmarks: name -> EMA keyword arguments
MODES: dict[str, dict[str, bool]] = {"default": {}, "flatten_model": {"flatten_model": True}}


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
        impl.step()  # starts the average at the weights (flatten_model: binds the model into its flat buffer)
        check_closed_form(impl)
        impls.append(impl)
    return impls, skipped


def bench_updates(layout: str, template: nn.Module, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Impl]]:
    """Median update time of every implementation on ``template``, with ratios; and the implementations.

    Per implementation: ``roofline_ratio = roofline_s / time_s``, the roofline timed in its own
    block (on CUDA also ``copy_roofline_ratio``); ``speedup_vs[other] = other's time_s / time_s``;
    for emakit's, ``vs_fastest_peer`` = the fastest peer's time_s / time_s. Rows with a target of
    the issue (for ``layout``) record it in ``targets``.
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
    fastest_peer = min((name for name in rows if is_peer(name)), key=lambda name: rows[name]["time_s"])
    for name, row in rows.items():
        row["speedup_vs"] = {other: rows[other]["time_s"] / row["time_s"] for other in rows if other != name}
        if not is_peer(name):
            row |= {"fastest_peer": fastest_peer, "vs_fastest_peer": rows[fastest_peer]["time_s"] / row["time_s"]}
        if (layout, name) in targets.UPDATE:
            key, target = targets.UPDATE[layout, name]
            row["targets"] = target.judge(row[key])
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
    return result, {impl.name: impl for impl in impls}


# -------------------------------------------------------------------------------- swap
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


# ------------------------------------------------------------------------- eval memory
EVAL_WINDOW = "emakit.bench.eval"  # the profiler's name for the evaluation's time span


def peak_in_window(profiler: torch.profiler.profile, device: torch.device) -> int:
    """Most bytes allocated on ``device``'s type since ``profiler`` started, at any moment in the eval window.

    From the profiler's allocation and free events (every tensor allocation, temporaries included).
    """
    events = profiler.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == EVAL_WINDOW)
    kind = device.type.upper()
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == kind
    )
    if not changes:
        raise RuntimeError(f"the profiler recorded no {device.type} allocations: cannot measure eval memory")
    level, peak = 0, None
    for at, nbytes in changes:
        if at > window.end_ns():
            break
        if at >= window.start_ns() and peak is None:
            peak = level  # what was allocated when the window opened
        level += nbytes
        if peak is not None:
            peak = max(peak, level)
    return level if peak is None else peak


def _eval_peak(template: nn.Module, mode: dict[str, bool] | None, device: torch.device) -> int:
    """Peak bytes allocated during ``Trainer.eval`` of a copy of ``template`` after 2 training batches.

    Counted from the start of the run: everything the run frees it allocated under the profiler,
    which knows the size of those blocks only. The inputs are tiny, so that activations do not
    hide the EMA's temporaries. ``mode``: the EMA's keyword arguments, or None for no EMA.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    gc.collect()  # no garbage of earlier runs freed during this one
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        generator = torch.Generator().manual_seed(0)
        images, labels = torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        loader = DataLoader(TensorDataset(images, labels), batch_size=2)
        trainer = Trainer(
            model=Classifier(copy.deepcopy(template)),
            train_dataloader=loader,
            max_duration="2ba",
            algorithms=[EMA(smoothing=SMOOTHING, **mode)] if mode is not None else [],
            device=device,
            seed=0,
            progress_bar=False,
        )
        trainer.fit()
        with torch.profiler.record_function(EVAL_WINDOW):
            trainer.eval(loader)
    return peak_in_window(profiler, device)


def bench_eval_memory(template: nn.Module, device: torch.device) -> dict[str, Any]:
    """Extra bytes an EMA adds during a Trainer evaluation, per mode, vs the model's bytes.

    ``extra_bytes`` = peak bytes allocated during ``trainer.eval`` with the EMA minus without,
    both counted from before the trainer was built: the average, the swap's temporaries, the
    parked buffers. Counted from the profiler's allocation events, so a temporary freed inside
    the swap counts too.
    """
    size = model_bytes(template)
    without = _eval_peak(template, None, device)
    result: dict[str, Any] = {"model_bytes": size}
    for name, mode in MODES.items():
        extra = _eval_peak(template, mode, device) - without
        target = targets.EVAL_MEMORY[name]
        result[name] = {"extra_bytes": extra, "ratio": extra / size, "targets": target.judge(extra / size)}
    return result


# ----------------------------------------------------------------------- attach memory
def _peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: allocated on CUDA; on the CPU its peak resident set.

    On Linux ``VmHWM``: ``ru_maxrss`` of a child of a big process starts at its parent's size (the
    kernel carries the peak of the forked copy across ``exec``), so it would hide a small model.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _reset_peak_memory(device: torch.device) -> None:
    """Let the peak start again from what the process holds now (Linux, CUDA); elsewhere it stays."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def attach_peaks(flatten_model: bool, layers: int, width: int, device: str) -> dict[str, int]:
    """Peak memory before building ``layers`` x ``nn.Linear(width, width)``, after, and after the first update.

    Meant for a fresh process (:func:`bench_attach_memory` runs it in one): nothing else allocates.
    The peak is reset first, after a first EMA on a tiny model has run emakit's lazy imports.
    The layers' initialisation writes every weight, so their memory is resident.
    """
    where = torch.device(device)
    EMA(smoothing=SMOOTHING, flatten_model=flatten_model).update(nn.Linear(2, 2, device=where))
    _reset_peak_memory(where)
    baseline = _peak_memory(where)
    model = nn.Sequential(*(nn.Linear(width, width, device=where) for _ in range(layers)))
    built = _peak_memory(where)
    EMA(smoothing=SMOOTHING, flatten_model=flatten_model).update(model)
    return {"model_bytes": model_bytes(model), "baseline": baseline, "built": built, "attached": _peak_memory(where)}


def bench_attach_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of attaching an EMA (its first update) to a fresh model, per mode, in a fresh process each.

    8 x ``nn.Linear(5000, 5000)``: 200M fp32 parameters, 800 MB (with ``--quick`` 8 x 500 x 500,
    2M). ``ratio`` = (peak after the update - ``baseline``) / the model's bytes, ``baseline`` being
    the peak reset to what the process holds just before building the model (on Linux; elsewhere
    the peak so far): the model and the average is 2.0; ``build_ratio`` (the same for the model
    alone) is 1.0 when the measurement is sound.
    """
    layers, width = 8, (500 if args.quick else 5000)
    result: dict[str, Any] = {"parameters": layers * width * (width + 1)}
    for name, mode in MODES.items():
        call = f"attach_peaks({mode.get('flatten_model', False)}, {layers}, {width}, '{args.device}')"
        code = (
            f"import json, torch; torch.set_num_threads({args.threads}); "
            f"from emakit.bench.measure import attach_peaks; print(json.dumps({call}))"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"attach memory ({name}) failed in its subprocess:\n{child.stderr}")
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
        size, baseline = peaks["model_bytes"], peaks["baseline"]
        ratio = (peaks["attached"] - baseline) / size
        result["model_bytes"] = size
        result[name] = {
            "peak_bytes": peaks,
            "build_ratio": (peaks["built"] - baseline) / size,
            "ratio": ratio,
            "targets": targets.ATTACH_MEMORY.judge(ratio),
        }
    return result


# ----------------------------------------------------------------------------- trainer
class _TimedEMAAlgorithm(EMAAlgorithm):
    """An EMA's trainer adapter, also summing the wall time spent in its event handlers (updates and swaps)."""

    def __init__(self, ema: EMA) -> None:
        super().__init__(ema)
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


def _train(data: TensorDataset, batches: int, with_ema: bool, device: torch.device) -> tuple[float, Trainer]:
    """Wall seconds of ``Trainer.fit`` of ``batches`` batches of a small CNN, with EMA every batch or not."""
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(_small_cnn()),
        train_dataloader=DataLoader(data, batch_size=32),
        max_duration=f"{batches}ba",
        algorithms=[_TimedEMAAlgorithm(EMA(half_life="50ba"))] if with_ema else [],
        device=device,
        seed=0,
        progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start, trainer


def bench_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer wall time with ``EMA(half_life="50ba")`` every batch over without; alternated, median ratio.

    ``ema_share``: the wall time inside the EMA's event handlers over the run's, median over the runs.
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
    share = statistics.median(inside)
    return {
        "batches": batches,
        "pairs": pairs,
        "with_ema_s": statistics.median(with_ema),
        "without_ema_s": statistics.median(without),
        "ratio": statistics.median(ratios),
        "ema_share": share,
        "targets": targets.EMA_SHARE.judge(share),
    }
