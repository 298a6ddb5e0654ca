"""The 2-rank row of ``emakit bench``: ``EMA(shard_over_ranks=True)`` against the whole EMA, in the same run.

Two CPU processes (gloo, started by ``torch.distributed.run``) each hold the whole layout, as under DDP, and time,
round-robin in the same run, one ``ema.update(model)`` and one ``ema_weights`` swap (in and out) of an EMA split over
the ranks and of the whole EMA; each rank's average bytes are read from the EMAs. Rank 0 prints every rank's numbers
as JSON; :func:`bench_ranks` runs it in a fresh process group and reports per-rank medians and the ratios::

    update ratio = split update time / whole update time      (1/2 when an update is bound by its bytes)
    bytes ratio  = split average bytes / whole average bytes  (1/2 + alignment)

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m emakit.bench.ranks convnet --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from emakit import EMA
from emakit.bench.layouts import LAYOUTS
from emakit.bench.peers import SMOOTHING
from emakit.bench.timing import time_round_robin

__all__ = ["bench_ranks", "measure_ranks"]

RANKS = 2


def measure_ranks(layout: str, quick: bool, repeats: int, warmup: int, threads: int) -> dict[str, Any] | None:
    """On every rank of a started process group: each rank's update and swap times and average bytes, split and
    whole. Returns every rank's numbers on rank 0, None elsewhere. Collective."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LAYOUTS[layout](quick)
    split, whole = EMA(smoothing=SMOOTHING, shard_over_ranks=True), EMA(smoothing=SMOOTHING)
    for ema in (split, whole):
        ema.update(model)  # laid out, started
        ema.update(model)

    def swap(ema: EMA) -> None:
        with ema.ema_weights(model):
            pass

    times = time_round_robin(
        {
            "split_update": lambda: split.update(model),
            "whole_update": lambda: whole.update(model),
            "split_swap": lambda: swap(split),
            "whole_swap": lambda: swap(whole),
        },
        repeats,
        warmup,
        torch.device("cpu"),
    )  # every rank runs the same calls in the same order: the swaps' collectives meet
    mine = {**times, "split_bytes": split.shadow.nbytes, "whole_bytes": whole.shadow.nbytes}
    everyone: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return {"layout": layout, "ranks": everyone} if everyone is not None else None


def bench_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """The 2-rank row, in a fresh process group of 2 CPU processes (``--threads`` shared between them): per-rank
    medians (the slowest rank's, which sets the pace of a step) and the split/whole ratios."""
    layout = args.layouts[0]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
        "-m", "emakit.bench.ranks", layout, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--threads", str(max(1, args.threads // RANKS)), *(["--quick"] if args.quick else []),
    ]  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the 2-rank bench failed in its processes:\n{child.stderr[-4000:]}")
    measured = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("{")))
    ranks = measured["ranks"]

    def worst(key: str) -> float:  # the slowest rank sets the pace of a step
        return max(rank[key] for rank in ranks)

    return {
        "layout": layout,
        "ranks": len(ranks),
        "per_rank": ranks,
        "split_update_s": worst("split_update"),
        "whole_update_s": worst("whole_update"),
        "update_ratio": worst("split_update") / worst("whole_update"),
        "split_swap_s": worst("split_swap"),
        "whole_swap_s": worst("whole_swap"),
        "split_bytes": max(rank["split_bytes"] for rank in ranks),
        "whole_bytes": max(rank["whole_bytes"] for rank in ranks),
        "bytes_ratio": max(rank["split_bytes"] / rank["whole_bytes"] for rank in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("layout", choices=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    result = measure_ranks(args.layout, args.quick, args.repeats, args.warmup, args.threads)
    if result is not None:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
