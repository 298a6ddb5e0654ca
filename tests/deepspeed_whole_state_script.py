"""Run under torchrun (2 CPU processes, gloo, ``DS_ACCELERATOR=cpu``): an EMA of a DeepSpeed ZeRO-3 engine saved
whole (``ema.state_dict(whole=True)``: gathered to rank 0, as Lightning's DeepSpeed checkpoint keeps callback states
from rank 0 only) and loaded on every rank, each keeping its own partitions.

Checks, per rank: rank 0's whole state holds the full tensors (equal to the gathered export), the others' none;
loaded into a fresh EMA before it is laid out, and into one already laid out, it gives this rank's partitions bit
for bit as the EMA that saved it; an update after the load keeps them equal. Prints ``rank R: ok``.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed_ema_script import SMOOTHING, make_engine, train_step

from emakit import EMA


def partitions(ema: EMA) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in ema.state_dict()["weights"].items()}


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name} differs"


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = make_engine(3, torch.float32, 0)  # every parameter partitioned
    ema = EMA(smoothing=SMOOTHING)
    for step in range(1, 5):
        train_step(engine, step, torch.float32)
        ema.update(engine)
    shapes = {name: p.ds_shape for name, p in engine.module.named_parameters()}
    assert ema.state_dict()["partitioning"] == {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}

    whole = ema.state_dict(whole=True)  # collective
    exported = ema.ema_state_dict()  # the gathered export (rank 0), keyed like the module's state_dict
    assert whole["partitioning"] is None and whole["num_updates"] == 4
    if rank == 0:
        assert {name: value.shape for name, value in whole["weights"].items()} == shapes, whole["weights"]
        assert_equal(whole["weights"], {name: exported[key] for key, name in whole["state_dict_keys"].items()}, "whole")
        buffer = io.BytesIO()
        torch.save(whole, buffer)
        (out / "whole.pt").write_bytes(buffer.getvalue())
    else:
        assert whole["weights"] == {} and exported == {}, "only rank 0 receives the whole tensors"
    dist.barrier()
    saved = torch.load(out / "whole.pt", weights_only=True)  # rank 0's, on every rank

    pending, attached = EMA(smoothing=SMOOTHING), EMA(smoothing=SMOOTHING)
    pending.load_state_dict(saved)  # before any layout: taken apart at the first use
    pending.attach(engine.module)
    attached.attach(engine.module)
    attached.load_state_dict(saved)  # laid out already
    mine = partitions(ema)
    assert_equal(partitions(pending), mine, f"rank {rank}'s partitions loaded before layout")
    assert_equal(partitions(attached), mine, f"rank {rank}'s partitions loaded after layout")
    assert pending.state_dict()["partitioning"] == ema.state_dict()["partitioning"]

    train_step(engine, 5, torch.float32)
    for average in (ema, pending, attached):
        average.update(engine)
    assert_equal(partitions(pending), partitions(ema), f"rank {rank} after one more update")
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)
