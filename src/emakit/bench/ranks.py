"""The per-rank cost of a sharded average: 2 processes, each averaging its part, against the whole average.

Under data parallelism every rank keeps the whole average (what a plain EMA under DDP costs). This section launches
``RANKS`` CPU processes (``torch.distributed.run``, gloo) on the first layout; each builds the model from one seed and
keeps three EMAs of it, each checked against the closed form of one update before it is timed:

``whole``            ``EMA()`` of the model, whole on every rank;
``shard_over_ranks`` ``EMA(shard_over_ranks=True)`` of the same model: each rank updates 1/N of the flat average;
``fsdp2``            ``EMA()`` of an FSDP2-sharded copy (``fully_shard``): each rank averages its shards (torch 2.9+).

Their updates (no communication in any) and ``ema_weights`` swaps (in and out; ``shard_over_ranks`` all-gathers the
average into the model) are timed round-robin in the same run, every rank running the same calls in one order::

    update ratio = update time / whole update time              per rank; 1/N when an update is bound by its bytes
    bytes ratio  = average's bytes / whole average's bytes      per rank; 1/N (+ padding) at best

The slowest rank's times and the largest rank's bytes are reported (a step waits for the slowest rank). Each
process runs ``threads // RANKS`` torch threads (at least 1), so the ranks share the machine as training would.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m emakit.bench.ranks convnet OUT.json --quick
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.bench import targets
from emakit.bench.layouts import LAYOUTS
from emakit.bench.peers import SMOOTHING
from emakit.bench.timing import time_round_robin

__all__ = ["RANKS", "bench_ranks", "summarize"]

RANKS = 2
SHARDED = ("shard_over_ranks", "fsdp2")  # each against "whole"


def bench_ranks(layout: str, args: argparse.Namespace) -> dict[str, Any]:
    """Launch the ranks on ``layout``; per-rank medians, the slowest / largest, and the ratios to the whole EMA.

    Returns ``{"skipped": reason}`` off the CPU (the ranks run on gloo). Without FSDP2 on CPU (torch < 2.9) the
    ``fsdp2`` row is left out.
    """
    if args.device.type != "cpu":
        return {"skipped": "the ranks run on the CPU (gloo) only"}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ranks.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
            "-m", "emakit.bench.ranks", layout, str(out), "--repeats", str(args.repeats), "--warmup",
            str(args.warmup), "--threads", str(max(1, args.threads // RANKS)), *(["--quick"] if args.quick else []),
        ]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // RANKS))}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            environment.pop(name, None)
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"emakit bench: the {RANKS}-rank run failed:\n{result.stderr[-4000:]}")
        return summarize(layout, json.loads(out.read_text()))


def summarize(layout: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The slowest rank's times and the largest rank's bytes per EMA, the ratios to ``whole`` and the bytes target."""
    kinds = ["whole", *(kind for kind in SHARDED if f"{kind}_update_s" in ranks[0])]
    result: dict[str, Any] = {"layout": layout, "ranks": len(ranks), "per_rank": ranks, "kinds": kinds}
    for kind in kinds:
        for key in ("update_s", "swap_s", "bytes"):
            result[f"{kind}_{key}"] = max(rank[f"{kind}_{key}"] for rank in ranks)
    result["targets"] = {}
    for kind in kinds[1:]:
        result[f"{kind}_update_ratio"] = result[f"{kind}_update_s"] / result["whole_update_s"]
        result[f"{kind}_swap_ratio"] = result[f"{kind}_swap_s"] / result["whole_swap_s"]
        result[f"{kind}_bytes_ratio"] = result[f"{kind}_bytes"] / result["whole_bytes"]
        result["targets"][kind] = targets.RANK_BYTES.judge(result[f"{kind}_bytes_ratio"])
    return result


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered (collective), others as they are."""
    from emakit.storage.sharded import is_dtensor

    return tensor.full_tensor() if is_dtensor(tensor) else tensor.detach()


def _check_one_update(ema: Any, model: nn.Module, name: str) -> None:
    """Scale every weight, update once, and compare the average with ``s * before + (1 - s) * after`` where this
    rank receives it (every rank for whole and FSDP2 averages, rank 0 for ``shard_over_ranks``). Collective."""
    from emakit.storage.sharded import local

    before = ema.ema_state_dict()
    with torch.no_grad():
        for p in model.parameters():
            local(p).mul_(1.5)
    ema.update(model)
    after = ema.ema_state_dict()
    weights = {key: _full(value) for key, value in model.state_dict().items()}
    for key, now in after.items():
        if now.is_floating_point():
            expected = SMOOTHING * before[key].double() + (1 - SMOOTHING) * weights[key].double()
            if not torch.allclose(now.double(), expected, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"emakit bench: the {name} average of {key} is off the closed form of one step")


def _rank_main(argv: list[str]) -> None:
    """One rank: build, check and time the averages; rank 0 writes every rank's numbers to OUT."""
    import torch.distributed as dist

    from emakit import EMA, distributed

    parser = argparse.ArgumentParser(prog="python -m emakit.bench.ranks")
    parser.add_argument("layout", choices=list(LAYOUTS))
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)  # the same model on every rank
        whole = LAYOUTS[args.layout](args.quick)
        models: dict[str, nn.Module] = {"whole": whole, "shard_over_ranks": whole}
        emas = {"whole": EMA(smoothing=SMOOTHING), "shard_over_ranks": EMA(smoothing=SMOOTHING, shard_over_ranks=True)}
        if distributed.TORCH_VERSION >= distributed.FSDP_ON_CPU_SINCE:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            sharded = copy.deepcopy(whole)
            fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))  # in place: its parameters become shards
            models["fsdp2"], emas["fsdp2"] = sharded, EMA(smoothing=SMOOTHING)
        for name, ema in emas.items():
            ema.update(models[name])  # starts the average
            _check_one_update(ema, models[name], name)

        def swap(name: str) -> None:
            with emas[name].ema_weights(models[name]):
                pass

        def update(name: str) -> None:
            emas[name].update(models[name])

        calls: dict[str, Callable[[], object]] = {}
        for name in emas:
            calls[f"{name}_update"] = functools.partial(update, name)
            calls[f"{name}_swap"] = functools.partial(swap, name)
        # every rank runs the same calls in one order: the swaps' collectives meet
        row: dict[str, Any] = {
            f"{key}_s": seconds
            for key, seconds in time_round_robin(calls, args.repeats, args.warmup, torch.device("cpu")).items()
        }
        row |= {"rank": rank, **{f"{n}_bytes": ema.shadow.nbytes for n, ema in emas.items()}}
        rows: list[Any] = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            Path(args.out).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # DTensor's caches keep the gloo group alive past destroy_process_group (see tests' scripts)
