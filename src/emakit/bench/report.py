"""Readable tables of the benchmark's results, and the machine they were taken on."""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import torch

from emakit.bench import targets
from emakit.bench.peers import IMPLEMENTATIONS, MODES, SMOOTHING
from emakit.bench.targets import Target

__all__ = ["format_table", "layout_table", "machine", "summary_tables", "verdict"]

PACKAGES = ("emakit", "torch", "torch_ema", "ema-pytorch", "diffusers", "timm")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under headers and a rule, the first column left-aligned, the others right-aligned."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(row) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(value: float | None, target: Target, spec: str = ".3f") -> str:
    """``value`` and whether it meets ``target``: ``0.940 pass``, ``2.004 FAIL``; ``n/a`` without a value."""
    if value is None:
        return "n/a"
    return f"{value:{spec}} {'pass' if target.passes(value) else 'FAIL'}"


def layout_table(name: str, result: dict[str, Any], args: argparse.Namespace) -> str:
    """One layout: time, roofline ratio and speedup over every other implementation, per implementation.

    The last column: the issue's target for the row on this layout, if any, and whether it is met.
    """
    shorts = {n: s for n, s, _, _ in IMPLEMENTATIONS}
    impls, roof = result["implementations"], result["roofline"]
    names, cuda = list(impls), "copy_s" in roof
    headers = ["implementation", "ms", "roofline ms", "x lerp", *(["x copy"] if cuda else [])]
    headers += [f"/{shorts[n]}" for n in names] + ["target"]
    rows = []
    for n in names:
        row = impls[n]
        ratios = [f"{row['roofline_ratio']:.3f}", *([f"{row['copy_roofline_ratio']:.3f}"] if cuda else [])]
        speedups = ("-" if other == n else f"{row['speedup_vs'][other]:.2f}" for other in names)
        key, target = targets.UPDATE.get((name, n), (None, None))
        goal = f"{target.label} {verdict(row[key], target, '.2f')} ({target.op} {target.limit:g})" if target else ""
        rows.append([n, f"{row['time_s'] * 1e3:.3f}", f"{row['roofline_s'] * 1e3:.3f}", *ratios, *speedups, goal])
    roof_text = ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.3f} ms" for k, v in roof.items())  # over blocks
    title = (
        f"== {name}: {result['tensors']} tensors, {result['elements']:,} averaged elements, fp32, "
        f"{args.device.type}, {args.threads} threads; roofline (median over blocks): {roof_text}"
    )
    legend = (
        "roofline ms: the flat lerp_ timed alternately with this row; x lerp = roofline ms / ms "
        "(1.0 = at the memory-bandwidth limit); /NAME = NAME's ms / this row's ms (speedup over NAME); "
        "/fastest peer = the fastest non-emakit row's ms / this row's ms"
    )
    skipped = "".join(f"\nskipped {k}: {v}" for k, v in result["skipped"].items())
    return f"{title}\n{format_table(headers, rows)}\n{legend}{skipped}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def summary_tables(results: dict[str, Any]) -> str:
    """Swap time, eval memory, attach memory and trainer overhead, each ratio with its target."""
    layouts = results["layouts"]
    swap = format_table(
        [
            "layout",
            "one copy ms",
            "torch_ema ms",
            "default ms",
            f"default / torch_ema (target {targets.SWAP_DEFAULT.op} {targets.SWAP_DEFAULT.limit:g})",
            "flatten_model ms",
            f"flatten_model / one copy (target {targets.SWAP_FLATTEN.op} {targets.SWAP_FLATTEN.limit:g})",
        ],
        [
            [
                n,
                _ms(s["copy_s"]),
                _ms(s["torch_ema_s"]),
                _ms(s["default_s"]),
                verdict(s["default_vs_torch_ema"], targets.SWAP_DEFAULT),
                _ms(s["flatten_model_s"]),
                verdict(s["flatten_model_vs_copy"], targets.SWAP_FLATTEN, ".4f"),
            ]
            for n, s in ((n, r["swap"]) for n, r in layouts.items())
        ],
    )
    limits = {mode: f"target {t.op} {t.limit:g}" for mode, t in targets.EVAL_MEMORY.items()}
    memory = format_table(
        [
            "layout",
            "model MB",
            *(f"{mode} {column}" for mode in MODES for column in ("extra MB", f"ratio ({limits[mode]})")),
        ],
        [
            [n, f"{m['model_bytes'] / 1e6:.2f}"]
            + [
                cell
                for mode in MODES
                for cell in (
                    f"{m[mode]['extra_bytes'] / 1e6:.2f}",
                    verdict(m[mode]["ratio"], targets.EVAL_MEMORY[mode]),
                )
            ]
            for n, m in ((n, r["eval_memory"]) for n, r in layouts.items())
        ],
    )
    parts = [
        "== swap: ema_weights(model) in and out, EMA() (default) and EMA(flatten_model=True), vs one flat copy_ "
        f"of the weights and torch_ema's average_parameters() (store, copy_to, restore); round-robin, medians\n{swap}",
        "== eval memory: peak bytes allocated during Trainer.eval with the EMA minus without (the average, the "
        "swap's temporaries, parked buffers; from the profiler's allocation events) vs the model's bytes\n"
        f"{memory}",
    ]
    several = results.get("several")
    if several:
        kind = f"(target {targets.AVERAGE_KIND.op} {targets.AVERAGE_KIND.limit:g})"
        fused = f"(target {targets.SEVERAL.op} {targets.SEVERAL.limit:g})"

        def timed(key: str, target: Target, versus: str = "one") -> str:
            return f"{_ms(several[f'{key}_s'])} ({verdict(several[f'{key}_vs_{versus}'], target, '.2f')})"

        table = format_table(
            [
                "layout",
                "one EMA ms",
                f"{several['averages']} averages in one EMA",
                f"{several['averages']} EMAs",
                "flatten_model: one ms",
                f"{several['averages']} averages, compile_update {fused}",
                f"uniform {kind}",
                f"window {several['window']} {kind}",
            ],
            [
                [
                    several["layout"],
                    _ms(several["one_s"]),
                    f"{_ms(several['several_s'])} ({several['several_vs_one']:.2f}x)",
                    f"{_ms(several['separate_s'])} ({several['separate_vs_one']:.2f}x)",
                    _ms(several["flat_one_s"]),
                    timed("compiled", targets.SEVERAL, versus="flat_one"),
                    timed("uniform", targets.AVERAGE_KIND),
                    timed("window", targets.AVERAGE_KIND),
                ]
            ],
        )
        parts.append(
            "== several: EMA(smoothing=(0.99, 0.999, 0.9999)) against one EMA and three EMAs (each average reads the "
            "weights), and with flatten_model=True, compile_update=True (one compiled kernel reads them once for all) "
            "against one flatten_model EMA; EMA(average='uniform') and "
            f"EMA(window='{several['window']}') (blocks completing every 10th update, amortised) against one "
            f"EMA; round-robin medians\n{table}"
        )
    posthoc = results.get("posthoc")
    if posthoc:
        table = format_table(
            [
                "layout",
                "model MB",
                "update / one EMA's",
                "snapshot ms",
                "snapshot / model bytes",
                "synthesis ms/snapshot",
            ],
            [
                [
                    posthoc["layout"],
                    f"{posthoc['model_bytes'] / 1e6:.2f}",
                    f"{posthoc['update_ratio']:.2f}",
                    _ms(posthoc["snapshot_write_s"]),
                    f"{posthoc['snapshot_bytes'] / posthoc['model_bytes']:.3f}",
                    _ms(posthoc["synthesis_s_per_snapshot"]),
                ]
            ],
        )
        parts.append(
            f"== posthoc: PostHocEMA(sigma_rels={tuple(posthoc['sigma_rels'])}) — its update against one EMA's "
            "(round-robin medians), one snapshot's write time and file size, and synthesis from "
            f"{posthoc['snapshots']} snapshots (one in memory at a time), per snapshot\n{table}"
        )
    attach = results.get("attach_memory")
    if attach:
        limit = f"target {targets.ATTACH_MEMORY.op} {targets.ATTACH_MEMORY.limit:g}"
        table = format_table(
            ["mode", "model MB", "before model MB", "build ratio", f"peak ratio ({limit})"],
            [
                [
                    mode,
                    f"{attach['model_bytes'] / 1e6:.1f}",
                    f"{attach[mode]['peak_bytes']['baseline'] / 1e6:.1f}",
                    f"{attach[mode]['build_ratio']:.3f}",
                    verdict(attach[mode]["ratio"], targets.ATTACH_MEMORY),
                ]
                for mode in MODES
            ],
        )
        memory = "resident set" if results["meta"]["device"] == "cpu" else "allocated"
        parts.append(
            f"== attach: peak memory of a fresh process ({memory}) "
            f"through building {attach['parameters']:,} fp32 parameters (8 nn.Linear) and the first ema.update: "
            "(peak - memory before the model) / the model's bytes; build ratio: the same after building (1.0)\n"
            f"{table}"
        )
    ranks = results.get("ranks")
    if ranks and "skipped" not in ranks:
        rows = [
            [
                ranks["layout"],
                kind,
                _ms(ranks[f"{kind}_update_s"]),
                "" if kind == "whole" else f"{ranks[f'{kind}_update_ratio']:.3f}",
                _ms(ranks[f"{kind}_swap_s"]),
                f"{ranks[f'{kind}_bytes'] / 1e6:.2f}",
                "" if kind == "whole" else verdict(ranks[f"{kind}_bytes_ratio"], targets.RANK_BYTES, ".4f"),
            ]
            for kind in ranks["kinds"]
        ]
        limit = f"target {targets.RANK_BYTES.op} {targets.RANK_BYTES.limit:g}"
        table = format_table(
            ["layout", "EMA", "update ms", "/ whole", "swap ms", "MB per rank", f"bytes / whole ({limit})"], rows
        )
        parts.append(
            f"== ranks: {ranks['ranks']} CPU processes (gloo, the threads shared), per rank: "
            "EMA(shard_over_ranks=True) and an EMA of FSDP2 shards against the whole EMA every DDP rank keeps, timed "
            "round-robin in the same run; the slowest rank's medians and the largest rank's bytes. No update "
            f"communicates; a shard_over_ranks swap all-gathers the average\n{table}"
        )
    elif ranks:
        parts.append(f"== ranks: skipped ({ranks['skipped']})")
    trainer = results.get("trainer")
    if trainer:
        table = format_table(
            ["run", "with EMA s", "without s", "A/B ratio", f"time in EMA (target <= {targets.EMA_SHARE.limit:.0%})"],
            [
                [
                    f"{trainer['batches']} batches, {trainer['pairs']} pairs",
                    f"{trainer['with_ema_s']:.3f}",
                    f"{trainer['without_ema_s']:.3f}",
                    f"{trainer['ratio']:.4f}",
                    verdict(trainer["ema_share"], targets.EMA_SHARE, ".2%"),
                ]
            ],
        )
        parts.append(
            "== trainer: small CNN, EMA(half_life='50ba') every batch vs none, runs alternated, "
            "medians. 'time in EMA' = wall time inside the EMA's event handlers / the run's wall time "
            f"(robust to machine noise); the A/B ratio of whole runs is as noisy as the machine\n{table}"
        )
    return "\n\n".join(parts)


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """Date, machine, settings and package versions, for the JSON and RESULTS.md."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "device": args.device.type,
        "threads": args.threads,
        "dtype": "float32",
        "smoothing": SMOOTHING,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "versions": versions,
    }
