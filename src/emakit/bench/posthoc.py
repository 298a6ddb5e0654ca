"""Post-hoc EMA's costs: its update against one EMA's, a snapshot's time and size, a synthesis's time."""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from torch import nn

from emakit import EMA, PostHocEMA
from emakit.algorithms.posthoc import snapshots_in, synthesize
from emakit.bench.measure import model_bytes, time_round_robin
from emakit.bench.peers import SMOOTHING

__all__ = ["bench_posthoc"]

SIGMA_RELS = (0.05, 0.10)
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
