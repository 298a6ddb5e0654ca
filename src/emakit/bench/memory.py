"""Memory: the extra bytes an EMA holds during a Trainer evaluation, and the peak of attaching one to a model.

During an evaluation, from the profiler's allocation and free events (every tensor allocation, also a temporary
freed before anything could look at it); for attaching an EMA, from the peak memory of a fresh process (resident
set on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import resource
import subprocess
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, Trainer
from emakit.bench import targets
from emakit.bench.peers import MODES, SMOOTHING, Mode
from emakit.bench.timing import model_bytes

__all__ = ["EVAL_WINDOW", "attach_peaks", "bench_attach_memory", "bench_eval_memory", "peak_in_window"]

# ------------------------------------------------------------------------- eval memory
EVAL_WINDOW = "emakit.bench.eval"  # the profiler's name for the evaluation's time span


def peak_in_window(profiler: torch.profiler.profile, device: torch.device) -> int:
    """Most bytes allocated on ``device``'s type since ``profiler`` started, at any moment in the eval window.

    From the profiler's allocation and free events (every tensor allocation, temporaries included).
    """
    assert profiler.profiler is not None and profiler.profiler.kineto_results is not None  # the profiler has run
    events = profiler.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == EVAL_WINDOW)
    kind = device.type.upper()
    changes = sorted(
        (e.start_ns(), e.nbytes())  # type: ignore[attr-defined]  # torch's stubs of _KinetoEvent lack nbytes
        for e in events
        if e.name() == "[memory]" and e.device_type().name == kind
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


def _eval_peak(template: nn.Module, mode: Mode | None, device: torch.device) -> int:
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
            f"from emakit.bench.memory import attach_peaks; print(json.dumps({call}))"
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
