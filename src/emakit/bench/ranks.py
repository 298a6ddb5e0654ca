"""The per-rank cost of a sharded average: 2 processes, each averaging its shards, against the whole average.

Under data parallelism every rank keeps the whole average (what DDP users get); with the weights sharded by FSDP2
(``fully_shard``) each rank averages its own shards, with no communication per update. This section launches
``RANKS`` processes (``torch.distributed.run``, gloo, CPU) on the first layout; each builds the model twice from the
same seed, one whole and one sharded, attaches an ``EMA()`` to each, checks one update of each against the closed
form of its own data, and times their updates round-robin with the flat ``lerp_`` roofline of the whole model::

    time_ratio  = sharded update time / whole update time        per rank; 1/RANKS at best
    bytes_ratio = sharded average's bytes / whole average's bytes per rank; 1/RANKS (+ padding) at best

The slowest rank's time and the largest rank's bytes are reported (a step waits for the slowest rank). Each
process runs ``threads // RANKS`` torch threads (at least 1), so the ranks share the machine as training would.

    python -m emakit.bench.ranks LAYOUT OUT.json [--quick] [--repeats N] [--warmup N] [--threads N]  # one rank
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.bench import targets
from emakit.bench.layouts import LAYOUTS
from emakit.bench.peers import SMOOTHING
from emakit.bench.timing import averaged_numel, rooflines, time_round_robin

__all__ = ["RANKS", "bench_ranks"]

RANKS = 2


def bench_ranks(layout: str, args: argparse.Namespace) -> dict[str, Any]:
    """Launch the ranks on ``layout``; their per-rank times and bytes, the slowest / largest, and the ratios.

    Returns ``{"skipped": reason}`` where this torch cannot shard on ``args.device`` (FSDP2 on CPU needs torch
    2.9+; the ranks run on the CPU only).
    """
    from emakit import distributed  # the trainer's side of the package: imported when this section runs

    if args.device.type != "cpu":
        return {"skipped": "the ranks run on the CPU (gloo) only"}
    if distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE:
        return {"skipped": f"FSDP2 on CPU needs torch {'.'.join(map(str, distributed.FSDP_ON_CPU_SINCE))}+"}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ranks.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", "emakit.bench.ranks", layout, str(out),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
            *(["--quick"] if args.quick else []),
        ]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // RANKS))}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            environment.pop(name, None)
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"emakit bench: the {RANKS}-rank run failed:\n{result.stderr[-4000:]}")
        ranks = json.loads(out.read_text())
    return summarize(layout, ranks)


def summarize(layout: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The slowest rank's times and the largest rank's bytes, with the ratios and the target on the bytes."""
    slowest = {key: max(rank[key] for rank in ranks) for key in ("whole_s", "sharded_s", "roofline_s")}
    largest = {key: max(rank[key] for rank in ranks) for key in ("whole_bytes", "sharded_bytes")}
    bytes_ratio = largest["sharded_bytes"] / largest["whole_bytes"]
    return {
        "layout": layout,
        "ranks": len(ranks),
        "per_rank": ranks,
        **slowest,
        **largest,
        "time_ratio": slowest["sharded_s"] / slowest["whole_s"],
        "bytes_ratio": bytes_ratio,
        "targets": targets.RANK_BYTES.judge(bytes_ratio),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_one_update(ema: Any, model: nn.Module) -> None:
    """Scale every weight, update once, and compare each rank's average with ``s * before + (1 - s) * after``."""
    from emakit.storage.sharded import local

    before = {name: local(value).detach().clone() for name, value in ema.shadow.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            local(p).mul_(1.5)
    ema.update(model)
    weights = {name: local(p).detach() for name, p in model.named_parameters()}
    if set(weights) != set(before):
        raise RuntimeError(
            f"emakit bench: the average holds {sorted(before)[:3]}..., the model {sorted(weights)[:3]}..."
        )
    for name, now in ema.shadow.state_dict().items():
        expected = SMOOTHING * before[name].double() + (1 - SMOOTHING) * weights[name].double()
        if not torch.allclose(local(now).double(), expected, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"emakit bench: this rank's average of {name} is off the closed form of one step")


def _rank_main(argv: list[str]) -> None:
    """One rank: build, check and time both averages; rank 0 writes every rank's numbers to OUT."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from emakit import EMA

    parser = argparse.ArgumentParser(prog="python -m emakit.bench.ranks")
    parser.add_argument("layout", choices=list(LAYOUTS))
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(max(1, args.threads // world))
        torch.manual_seed(0)  # the same model on every rank
        whole = LAYOUTS[args.layout](args.quick)
        sharded = copy.deepcopy(whole)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))  # in place: its parameters become shards
        emas = {"whole": EMA(smoothing=SMOOTHING), "sharded": EMA(smoothing=SMOOTHING)}
        models: dict[str, nn.Module] = {"whole": whole, "sharded": sharded}
        for name, ema in emas.items():
            ema.update(models[name])  # starts the average
            _check_one_update(ema, models[name])
        device = torch.device("cpu")
        times = time_round_robin(
            rooflines(averaged_numel(whole), device) | {n: (lambda n=n: emas[n].update(models[n])) for n in emas},
            args.repeats,
            args.warmup,
            device,
        )
        row = {
            "rank": rank,
            "roofline_s": times["lerp"],
            "whole_s": times["whole"],
            "sharded_s": times["sharded"],
            "whole_bytes": emas["whole"].shadow.nbytes,
            "sharded_bytes": emas["sharded"].shadow.nbytes,
        }
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
