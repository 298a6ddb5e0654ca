"""Run under torchrun with 2 processes (gloo, ``DS_ACCELERATOR=cpu``): ``EMA(shard_over_ranks=True)`` of a DeepSpeed
ZeRO-1/2 engine (parameters whole on every rank), by hand.

Usage: shard_over_ranks_zero_script.py STAGE DTYPE

Checks: no collective inside ``ema.update`` (with a positive control); the whole average, assembled from every
rank's state for the check only, equals the float64 closed form of the module's weights on every rank; each rank
holds about half the bytes of the whole average; the engine's forward inside ``ema_weights`` equals a plain model
holding the exported average (rank 0); training is bit for bit as an engine without the EMA; under ZeRO-3 the
option is refused naming the engine, and ``train_with_ema_weights`` (which would have to write ZeRO-1/2's fp32
master fragments) is refused naming the tensor. Every rank prints ``rank R: ok``.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed_ema_script import (
    SMOOTHING,
    STEPS,
    check_refused,
    closed_form,
    counting_collectives,
    make_engine,
    make_model,
    train_step,
    training_weights,
)

from emakit import EMA


def main(stage: int, dtype_name: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    engine, twin = make_engine(stage, dtype, 0), make_engine(stage, dtype, 0)
    ema = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    history, evaluation = [], None
    for step in range(1, STEPS + 1):
        for model in (engine, twin):
            train_step(model, step, dtype)
        with counting_collectives() as calls:
            ema.update(engine)
        assert calls == [], f"ema.update communicated: {calls}"
        history.append({name: p.detach().double().clone() for name, p in engine.module.named_parameters()})
        with torch.no_grad(), ema.ema_weights(engine.module):
            evaluation = engine.module(probe).float()
    with counting_collectives() as calls:  # the positive control: the export's sends and receives are seen
        exported = ema.ema_state_dict()
    assert calls, "the collective counter saw nothing: it would see nothing inside ema.update either"

    expected = closed_form(history)
    state = ema.state_dict()
    assert state["partitioning"]["engine"] == "shard_over_ranks" and state["partitioning"]["rank"] == rank
    pieces: list = [None, None]
    dist.all_gather_object(pieces, state["weights"])
    shapes = dict(engine.module.named_parameters())
    for name, value in expected.items():
        whole = torch.cat([p[name] for p in pieces]).view(shapes[name].shape)
        torch.testing.assert_close(whole.double(), value, atol=2e-6, rtol=1e-5, msg=f"rank {rank}: {name}")
    unsplit = EMA(smoothing=SMOOTHING)
    unsplit.update(make_model())
    ratio = ema.shadow.nbytes / unsplit.shadow.nbytes
    assert ratio <= 0.51, f"rank {rank}: {ratio:.4f} of the whole average's bytes"
    if rank == 0:
        reference = make_model().to(dtype)
        reference.load_state_dict(exported)
        with torch.no_grad():
            torch.testing.assert_close(evaluation, reference(probe).float(), msg="forward inside ema_weights")
    mine, theirs = training_weights(engine), training_weights(twin)
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), f"training with the EMA differs from without it: {name}"

    copying = EMA(smoothing=SMOOTHING, train_with_ema_weights=True, shard_over_ranks=True)
    check_refused(lambda: copying.update(engine), "fp32 master fragment")
    zero3 = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=zero3):
        partitioned = make_model()
    check_refused(lambda: EMA(shard_over_ranks=True).update(partitioned), "already sharded by DeepSpeed ZeRO-3")
    print(f"rank {rank}: ok ({ratio:.4f} of the whole average's bytes)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    os._exit(0)
