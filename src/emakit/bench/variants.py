"""The averaging variants' costs: several averages in one EMA, and post-hoc EMA (update, snapshots, synthesis)."""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from torch import nn

from emakit import EMA, PostHocEMA
from emakit.bench import targets
from emakit.bench.peers import SMOOTHING
from emakit.bench.timing import model_bytes, time_round_robin
from emakit.posthoc import snapshots_in, synthesize

__all__ = ["bench_posthoc", "bench_several"]

SIGMA_RELS = (0.05, 0.10)
SEVERAL = (0.99, 0.999, 0.9999)
WINDOW = "40ba"  # 4 blocks of 10 updates: a block completes (and the window is recombined) every 10th update


def bench_several(name: str, template: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """``EMA(smoothing=SEVERAL)`` (three averages) against one EMA and against three EMAs; a uniform and a windowed
    average against one exponential EMA (the window's block completions included, amortised); round-robin medians."""
    import copy

    models = [copy.deepcopy(template) for _ in range(7)]
    one, several, separate = EMA(smoothing=SMOOTHING), EMA(smoothing=SEVERAL), [EMA(smoothing=s) for s in SEVERAL]
    uniform, window = EMA(average="uniform"), EMA(window=WINDOW)
    flat_one = EMA(smoothing=SMOOTHING, flatten_model=True)
    compiled = EMA(smoothing=SEVERAL, flatten_model=True, compile_update=True)
    for ema, model in zip((one, several, uniform, window, flat_one, compiled), (*models[:2], *models[3:])):
        ema.update(model)  # starts (and binds, and compiles)
        ema.update(model)
    for ema in separate:
        ema.update(models[2])
    times = time_round_robin(
        {
            "one": lambda: one.update(models[0]),
            "several": lambda: several.update(models[1]),
            "separate": lambda: [ema.update(models[2]) for ema in separate],
            "uniform": lambda: uniform.update(models[3]),
            "window": lambda: window.update(models[4]),
            "flat_one": lambda: flat_one.update(models[5]),
            "compiled": lambda: compiled.update(models[6]),
        },
        args.repeats,
        args.warmup,
        args.device,
    )
    return {
        "layout": name,
        "averages": len(SEVERAL),
        "window": WINDOW,
        **{f"{key}_s": value for key, value in times.items()},
        "several_vs_one": times["several"] / times["one"],
        "separate_vs_one": times["separate"] / times["one"],
        "uniform_vs_one": times["uniform"] / times["one"],
        "window_vs_one": times["window"] / times["one"],
        "compiled_vs_flat_one": times["compiled"] / times["flat_one"],
        "targets": {
            **targets.SEVERAL.judge(times["compiled"] / times["flat_one"]),
            **{
                f"{kind}: {target}": passed
                for kind in ("uniform", "window")
                for target, passed in targets.AVERAGE_KIND.judge(times[kind] / times["one"]).items()
            },
        },
    }


SNAPSHOTS = 4  # per sigma_rel


def bench_posthoc(name: str, template: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """PostHocEMA with two widths on ``template``: update time / one EMA's, per-snapshot write time and bytes,
    and the time to synthesize from all snapshots, per snapshot."""
    import copy

    with tempfile.TemporaryDirectory() as folder:
        model, other = copy.deepcopy(template), copy.deepcopy(template)
        ema = EMA(smoothing=SMOOTHING)
        phema = PostHocEMA(SIGMA_RELS, snapshot_interval="1000000000ba", folder=folder)
        ema.update(other)
        phema.update(model)
        times = time_round_robin(
            {"ema": lambda: ema.update(other), "posthoc": lambda: phema.update(model)},
            args.repeats,
            args.warmup,
            args.device,
        )
        writes = []
        for _ in range(SNAPSHOTS):
            phema.update(model)
            start = time.perf_counter()
            phema.write_snapshots()
            writes.append((time.perf_counter() - start) / len(SIGMA_RELS))
        snapshot_bytes = [path.stat().st_size for _, _, path in snapshots_in(folder)]
        start = time.perf_counter()
        synthesize(folder, 0.08)
        synthesis_s = time.perf_counter() - start
    count = len(snapshot_bytes)
    return {
        "layout": name,
        "sigma_rels": list(SIGMA_RELS),
        "model_bytes": model_bytes(template),
        "ema_update_s": times["ema"],
        "posthoc_update_s": times["posthoc"],
        "update_ratio": times["posthoc"] / times["ema"],
        "snapshot_write_s": sorted(writes)[len(writes) // 2],
        "snapshot_bytes": max(snapshot_bytes),
        "snapshots": count,
        "synthesis_s": synthesis_s,
        "synthesis_s_per_snapshot": synthesis_s / count,
    }
