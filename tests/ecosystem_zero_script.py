"""Run under torchrun with 2 processes (gloo): DDP + ZeroRedundancyOptimizer with bucket views, with and without an EMA.

Usage: python -m torch.distributed.run --nproc_per_node 2 ecosystem_zero_script.py OUT_DIR

``ZeroRedundancyOptimizer(..., parameters_as_bucket_view=True)`` re-points every parameter into a view of one
bucket per rank at construction; each step, the rank owning a shard steps those parameters and broadcasts its
bucket to the other rank. A tensor re-pointed after that (out of the bucket) is stepped where nobody broadcasts,
or receives a broadcast where nobody reads: the ranks drift apart silently.

For each mode of :data:`MODES` every rank writes ``OUT_DIR/<mode>-rank<R>.pt``: the training weights after the
steps and, with an EMA, the average (``ema.ema_model``). Mode ``none`` has no EMA: the reference. Mode ``ema``
attaches a default ``EMA(smoothing=0.9)`` after ZeRO is built, updates it after every step (passing the DDP
wrapper, as a user would) and evaluates inside ``ema_weights`` after every step. ``flatten_model=True`` is not
run: it re-points the model's tensors and is documented as incompatible with ZeRO bucket views.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from emakit import EMA

torch.set_num_threads(1)

MODES = ("none", "ema")
STEPS = 4


def run(mode: str, out: Path) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    ddp = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9, parameters_as_bucket_view=True
    )
    ema = EMA(smoothing=0.9) if mode == "ema" else None
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batches: DDP averages the gradients
    for _ in range(STEPS):
        inputs = torch.randn(4, 8, generator=generator)
        optimizer.zero_grad()
        ddp(inputs).square().mean().backward()
        optimizer.step()
        if ema is not None:
            ema.update(ddp)
            with ema.ema_weights(ddp), torch.no_grad():
                ddp(inputs)
    result = {"weights": {name: t.detach().clone() for name, t in model.state_dict().items()}}
    if ema is not None:
        result["average"] = {name: t.detach().clone() for name, t in ema.ema_model.state_dict().items()}
    torch.save(result, out / f"{mode}-rank{rank}.pt")


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    for mode in MODES:
        run(mode, Path(out_dir))
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    # Every result is written and every rank passed the barrier: leave without destroying the group or finalizing.
    # Before torch 2.8 gloo's destructor can deadlock on the GIL with its own worker thread (torch's bug, not emakit's).
    sys.stdout.flush()
    os._exit(0)
