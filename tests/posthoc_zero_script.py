"""Run under torchrun with 2 processes (gloo, ``DS_ACCELERATOR=cpu``): PostHocEMA of a DeepSpeed ZeRO-3 engine.

Usage: posthoc_zero_script.py DTYPE OUT_DIR

Each rank trains a ZeRO-3 engine (every parameter partitioned; fp32 or bf16) for 12 steps on batches of its own; a
``PostHocEMA(sigma_rels=(0.05, 0.10), update_interval="2ba", snapshot_interval="4ba")`` is updated after every step
through ``phema.update(engine.module)``. It checks, on every rank:

- no collective runs inside an update that writes no snapshot (every ``torch.distributed`` and ``deepspeed.comm``
  collective counted, as in ``deepspeed_ema_script.py``); an update that writes snapshots gathers (the control);
- each rank's averages hold its partitions only (about 1/2 of the bytes of the same PostHocEMA of the plain model);
- a PostHocEMA resumed from the state each rank saved after 6 steps writes the same snapshots at steps 8 and 12, bit
  for bit, into a folder of its own.

Rank 0 writes ``OUT_DIR/records.pt``: the fp32 master weights after every step (gathered for the check only) and
the plain model's ``state_dict`` keys; the test compares the snapshots with EDM2's power-function EMA of them
(``posthoc_reference.py``). Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed_ema_script import counting_collectives, followed_weights, make_engine, make_model, train_step

from emakit import PostHocEMA

STEPS = 12
SAVE_AT = 6


def posthoc(folder: Path) -> PostHocEMA:
    return PostHocEMA(sigma_rels=(0.05, 0.10), update_interval="2ba", snapshot_interval="4ba", folder=folder)


def main(dtype_name: str, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    engine = make_engine(3, dtype, 0)
    phema, resumed = posthoc(out / "snapshots"), None
    history = {}
    for step in range(1, STEPS + 1):
        train_step(engine, step, dtype)
        history[step] = followed_weights(engine, 3)  # the fp32 masters, gathered (collective) for the check only
        with counting_collectives() as calls:
            phema.update(engine.module)
        if step % 4:
            assert calls == [], f"step {step}: an update without a snapshot communicated: {calls}"
        else:
            assert calls, f"step {step}: a snapshot of ZeRO-3 partitions must gather them"
        if resumed is not None:
            resumed.update(engine.module)
        if step == SAVE_AT:
            path = out / f"phema-state-rank{rank}.pt"
            torch.save(phema.state_dict(), path)
            resumed = posthoc(out / "resumed")
            resumed.load_state_dict(torch.load(path, weights_only=True))

    plain = posthoc(out / "plain")
    plain.attach(make_model())
    ratio = phema.shadows[0].nbytes / plain.shadows[0].nbytes
    assert ratio < 1 / world + 0.05, f"rank {rank}'s averages hold {ratio:.3f} of the unsharded bytes"
    dist.barrier()
    if rank == 0:
        torch.save({"history": history, "keys": list(make_model().state_dict())}, out / "records.pt")
        for t in (8, 12):
            for sigma_rel in phema.sigma_rels:
                name = f"phema-{t:010d}-{sigma_rel:.4f}.pt"
                first = torch.load(out / "snapshots" / name, weights_only=True)
                second = torch.load(out / "resumed" / name, weights_only=True)
                assert first.keys() == second.keys() and list(first["weights"]) == list(second["weights"])
                for key, value in first["weights"].items():
                    assert torch.equal(second["weights"][key], value), f"resumed snapshot {name} differs: {key}"
    print(f"rank {rank}: averages hold {ratio:.3f} of the unsharded bytes", flush=True)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
