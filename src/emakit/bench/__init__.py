"""Benchmark EMA updates against the memory-bandwidth roofline and peers; swaps, memory, trainer overhead.

Per layout (``convnet`` and ``many_small`` as DESIGN.md defines them, ``resnet18`` a ResNet-18-shaped
module built in-package) and per implementation (emakit's ``EMA.update``, default and with
``flatten_model=True``, and ``compute_ema``, the original per-tensor arithmetic, torch's
``AveragedModel``, ``torch_ema``, ``ema_pytorch``, diffusers' ``EMAModel``, timm's ``ModelEmaV3``;
peers where importable) it prints the median time of one update, its ratio to the roofline
(``roofline time / time``, 1.0 = at the limit) and its speedup over every other implementation. The
roofline is a flat ``ema.lerp_(param, w)`` over as many elements, timed in the same run; on CUDA also
a device-to-device copy moving as many bytes. Then per layout, for both modes of ``EMA``: the time of
an ``ema_weights`` swap in and out against one copy of the weights and against torch_ema's
``average_parameters()``, and the extra bytes a Trainer evaluation holds with the EMA; the peak
memory of attaching an EMA to a 200M-parameter model (a fresh process per mode); on 2 CPU processes, the
update and swap time and the bytes per rank of ``EMA(shard_over_ranks=True)`` and of an EMA of FSDP2 shards against
the whole EMA (:mod:`emakit.bench.ranks`); and the wall time of a short Trainer run with an EMA every batch against
one without.

Every implementation is checked against the closed form of one step before it is timed. Ratios are
measured in one run; absolute times depend on the machine (``--json`` records it). Each ratio the
issue sets a target for is printed with ``pass`` or ``FAIL`` and recorded in its row's ``targets``.

    emakit bench                        # all layouts, CPU, 2 threads
    emakit bench --json bench.json      # also write every number
    python benchmarks/run.py --quick    # tiny layouts, a few repeats
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from emakit.bench.layouts import LAYOUTS
from emakit.bench.memory import bench_attach_memory, bench_eval_memory
from emakit.bench.peers import IMPLEMENTATIONS, import_error
from emakit.bench.ranks import bench_ranks
from emakit.bench.report import layout_table, machine, summary_tables
from emakit.bench.swap import bench_swap
from emakit.bench.training import bench_trainer
from emakit.bench.updates import bench_updates
from emakit.bench.variants import bench_posthoc, bench_several

__all__ = ["IMPLEMENTATIONS", "LAYOUTS", "add_arguments", "import_error", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``emakit bench``."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="layouts to benchmark (default: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per implementation (default: 30, 3 with --quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="tiny layouts and few repeats, for tests")
    parser.add_argument("--no-trainer", dest="trainer", action="store_false", help="skip the trainer-overhead runs")
    parser.add_argument(
        "--no-attach", dest="attach", action="store_false", help="skip the memory of attaching an EMA to a 200M model"
    )
    parser.add_argument(
        "--no-ranks",
        dest="ranks",
        action="store_false",
        help="skip the 2-process run (shard_over_ranks, FSDP2 vs whole)",
    )


def _bench_layout(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Update speed, swap time and eval memory on one layout."""
    torch.manual_seed(0)
    template = LAYOUTS[name](args.quick).to(args.device)
    layout, impls = bench_updates(name, template, args)
    layout["swap"] = bench_swap(impls, args)
    del impls  # free their models and averages before measuring memory
    layout["eval_memory"] = bench_eval_memory(template, args.device)
    return layout


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for, print the tables, write the JSON if asked; returns the exit code."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("emakit bench: --device cuda, but torch sees no CUDA device")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"emakit bench: --repeats {args.repeats} must be >= 1")
    args.device = torch.device(args.device)
    args.repeats = args.repeats or (3 if args.quick else 30)
    args.warmup = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler (eval memory) would print 2 lines a run to stderr
    results: dict[str, Any] = {"meta": machine(args), "layouts": {}}
    for name in args.layouts:
        results["layouts"][name] = _bench_layout(name, args)
        print(layout_table(name, results["layouts"][name], args) + "\n", flush=True)
    first = args.layouts[0]
    results["several"] = bench_several(first, LAYOUTS[first](args.quick).to(args.device), args)
    results["posthoc"] = bench_posthoc(first, LAYOUTS[first](args.quick).to(args.device), args)
    if args.attach:
        results["attach_memory"] = bench_attach_memory(args)
    if args.ranks:
        results["ranks"] = bench_ranks(first, args)
    if args.trainer:
        results["trainer"] = bench_trainer(args)
    print(summary_tables(results), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``emakit bench`` as a function: parse ``argv`` and run."""
    parser = argparse.ArgumentParser(
        prog="emakit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
