"""Update speed: every implementation's median update time against the roofline of its own block and the others."""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

from torch import nn

from emakit.bench import targets
from emakit.bench.peers import IMPLEMENTATIONS, Impl, check_closed_form, import_error, is_peer
from emakit.bench.timing import averaged_numel, rooflines, time_round_robin
from emakit.tracked import tracked_tensors

__all__ = ["bench_updates"]


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
