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

from emakit.bench.peers import IMPLEMENTATIONS, SMOOTHING

__all__ = ["format_table", "layout_table", "machine", "summary_tables"]

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


def layout_table(name: str, result: dict[str, Any], args: argparse.Namespace) -> str:
    """One layout: time, roofline ratio and speedup over every other implementation, per implementation."""
    shorts = {n: s for n, s, _, _ in IMPLEMENTATIONS}
    impls, roof = result["implementations"], result["roofline"]
    names, cuda = list(impls), "copy_s" in roof
    headers = ["implementation", "ms", "roofline ms", "x lerp", *(["x copy"] if cuda else [])]
    headers += [f"/{shorts[n]}" for n in names]
    rows = []
    for n in names:
        row = impls[n]
        ratios = [f"{row['roofline_ratio']:.3f}", *([f"{row['copy_roofline_ratio']:.3f}"] if cuda else [])]
        speedups = ("-" if other == n else f"{row['speedup_vs'][other]:.2f}" for other in names)
        rows.append([n, f"{row['time_s'] * 1e3:.3f}", f"{row['roofline_s'] * 1e3:.3f}", *ratios, *speedups])
    roof_text = ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.3f} ms" for k, v in roof.items())  # over blocks
    title = (
        f"== {name}: {result['tensors']} tensors, {result['elements']:,} averaged elements, fp32, "
        f"{args.device.type}, {args.threads} threads; roofline (median over blocks): {roof_text}"
    )
    legend = (
        "roofline ms: the flat lerp_ timed alternately with this row; x lerp = roofline ms / ms "
        "(1.0 = at the memory-bandwidth limit); /NAME = NAME's ms / this row's ms (speedup over NAME)"
    )
    skipped = "".join(f"\nskipped {k}: {v}" for k, v in result["skipped"].items())
    return f"{title}\n{format_table(headers, rows)}\n{legend}{skipped}"


def summary_tables(results: dict[str, Any]) -> str:
    """Swap time, eval memory and trainer overhead."""
    layouts = results["layouts"]
    swap = format_table(
        ["layout", "swap in+out ms", "one copy ms", "ratio (target <= 0.1)"],
        [
            [n, f"{s['swap_s'] * 1e3:.4f}", f"{s['copy_s'] * 1e3:.3f}", f"{s['ratio']:.4f}"]
            for n, s in ((n, r["swap"]) for n, r in layouts.items())
        ],
    )
    memory = format_table(
        ["layout", "model MB", "extra MB in eval", "ratio (target <= 1.3)"],
        [
            [n, f"{m['model_bytes'] / 1e6:.2f}", f"{m['extra_bytes'] / 1e6:.2f}", f"{m['ratio']:.3f}"]
            for n, m in ((n, r["eval_memory"]) for n, r in layouts.items())
        ],
    )
    parts = [
        f"== swap: ema_weights(model) in and out vs one flat copy_ of the weights\n{swap}",
        f"== eval memory: tensor bytes an EMA adds inside ema_weights vs the model's bytes\n{memory}",
    ]
    trainer = results.get("trainer")
    if trainer:
        table = format_table(
            [
                "run",
                "with EMA s",
                "without s",
                "A/B ratio",
                "time in EMA (target <= 3%)",
                "eval extra MB",
                "model MB",
                "eval memory ratio (target <= 1.3)",
            ],
            [
                [
                    f"{trainer['batches']} batches, {trainer['pairs']} pairs",
                    f"{trainer['with_ema_s']:.3f}",
                    f"{trainer['without_ema_s']:.3f}",
                    f"{trainer['ratio']:.4f}",
                    f"{trainer['ema_share']:.2%}",
                    f"{trainer['eval_extra_bytes'] / 1e6:.3f}",
                    f"{trainer['eval_model_bytes'] / 1e6:.3f}",
                    f"{trainer['eval_memory_ratio']:.3f}",
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
