"""The EMA's speed as fractions of the device's copy bandwidth, and how much of an update an asynchronous one hides.

``python -m emakit.bench.device_report --device cuda --json report.json`` (``scripts/gpu-check`` runs it).
Measured in one process, every contender timed round-robin against a device-to-device copy:

- ``copy``: ``target.copy_(source)`` of the layout's elements; bandwidth = bytes read + written / time.
- ``update`` (per mode): ``EMA.update`` moves 3 x the average's bytes (reads the average and the weights,
  writes the average); its fraction of the copy bandwidth is ``3 * bytes / time / copy bandwidth``.
- ``swap`` (per mode): one ``with ema.ema_weights(model): pass``, as a multiple of one copy of the weights.
- ``overlap``: a training step (forward, backward, SGD) of an MLP without an EMA, with a synchronous
  update after it and with ``async_update=True``; ``hidden = (sync - async) / (sync - none)`` is the share
  of the update's time the side stream hides (1: all of it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from emakit import EMA
from emakit.bench.layouts import LAYOUTS
from emakit.bench.peers import MODES
from emakit.bench.timing import averaged_numel, time_round_robin

__all__ = ["measure_layout", "measure_overlap", "report"]


def measure_layout(name: str, device: torch.device, repeats: int, quick: bool) -> dict[str, Any]:
    """Copy bandwidth, and per mode the update's fraction of it and a swap's multiple of one copy."""
    torch.manual_seed(0)
    template = LAYOUTS[name](quick).to(device)
    numel = averaged_numel(template)
    source, target = torch.randn(numel, device=device), torch.empty(numel, device=device)
    models = {mode: LAYOUTS[name](quick).to(device) for mode in MODES}
    emas = {mode: EMA(smoothing=0.999, **kwargs) for mode, kwargs in MODES.items()}
    for mode, ema in emas.items():
        ema.update(models[mode])  # starts the average (flatten_model: binds the model)
        ema.update(models[mode])

    def updating(mode: str) -> Callable[[], bool]:
        return lambda: emas[mode].update(models[mode])

    def swap(mode: str) -> Callable[[], None]:
        def once() -> None:
            with emas[mode].ema_weights(models[mode]):
                pass

        return once

    fns: dict[str, Callable[[], object]] = {"copy": lambda: target.copy_(source)}
    fns |= {f"update/{mode}": updating(mode) for mode in MODES}
    fns |= {f"swap/{mode}": swap(mode) for mode in MODES}
    times = time_round_robin(fns, repeats, warmup=3, device=device)
    nbytes = numel * 4
    bandwidth = 2 * nbytes / times["copy"]
    result: dict[str, Any] = {
        "numel": numel,
        "tensors": len(list(template.parameters())) + len(list(template.buffers())),
        "copy_s": times["copy"],
        "copy_GBps": bandwidth / 1e9,
    }
    for mode in MODES:
        update, swapped = times[f"update/{mode}"], times[f"swap/{mode}"]
        result[mode] = {
            "update_s": update,
            "update_fraction_of_copy_bandwidth": 3 * nbytes / update / bandwidth,
            "swap_s": swapped,
            "swap_vs_one_copy": swapped / times["copy"],
        }
    return result


def _mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device)


def measure_overlap(device: torch.device, repeats: int, quick: bool) -> dict[str, Any]:
    """Step time of an MLP without an EMA, with a synchronous update and with an asynchronous one."""
    width, depth, batch = (256, 4, 64) if quick else (4096, 8, 4096)
    x = torch.randn(batch, width, device=device)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, EMA | None]] = {}
    for name, ema in (
        ("none", None),
        ("sync", EMA(smoothing=0.999)),
        ("async", EMA(smoothing=0.999, async_update=True)),
    ):
        model = _mlp(width, depth, device)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-4), ema)

    def step(name: str) -> Callable[[], None]:
        model, optimizer, ema = runs[name]

        def once() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()  # waits for the previous asynchronous update first
            if ema is not None:
                ema.update(model)

        return once

    fns = {name: step(name) for name in runs}
    if device.type == "cuda":  # one step = the steady state: the next step's optimizer waits for this update
        fns = {name: _steady(fn) for name, fn in fns.items()}
    times = time_round_robin(fns, repeats, warmup=3, device=device)
    cost = times["sync"] - times["none"]
    return {
        "parameters": sum(p.numel() for p in runs["none"][0].parameters()),
        **{f"{name}_s": t for name, t in times.items()},
        "hidden": (times["sync"] - times["async"]) / cost if cost > 0 else None,
    }


def _steady(fn: Callable[[], None]) -> Callable[[], None]:
    """Two steps per call, so an asynchronous update's wait in the next step is inside the timed span."""

    def twice() -> None:
        fn()
        fn()

    return twice


def report(device: torch.device, layouts: list[str], repeats: int, quick: bool) -> dict[str, Any]:
    """Every measurement of this module on ``device``."""
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "layouts": {name: measure_layout(name, device, repeats, quick) for name in layouts},
        "overlap": measure_overlap(device, repeats, quick),
    }
    fractions = [r[m]["update_fraction_of_copy_bandwidth"] for r in result["layouts"].values() for m in MODES]
    result["median_update_fraction"] = statistics.median(fractions)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emakit.bench.device_report", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report to PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_report: --device cuda, but torch sees no CUDA device")
    result = report(device, args.layouts, args.repeats, args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
