"""Run under torchrun with 2 processes, DeepSpeed on the CPU: uniform and windowed averages of a ZeRO-3 engine.

Usage: DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 averages_zero_script.py

Each rank averages its own fp32 master partitions (``stage3_param_persistence_threshold: 0``: every parameter is
partitioned), the window's blocks too. After every step each average, gathered, must equal its float64 definition
over the full master weights of the update steps; a state saved at a block boundary and loaded by a fresh EMA
continues and exports; no update communicates; each rank holds about half of the averages' bytes. Every rank prints
``rank R: ok``.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from closed_form import uniform_mean, window_mean
from deepspeed_ema_script import counting_collectives, followed_weights, make_engine, make_model, train_step

from emakit import EMA

# resumed before step 7, from the state after 6 updates: at a block boundary (blocks of 2), where the next update
# writes a new block and not the visible average, which must still export
STEPS, RESUME_AT = 13, 7
LABELS = ("uniform", "window@6ba")


def make_ema() -> EMA:
    return EMA(average=["uniform", "window"], window="6ba", window_blocks=3)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = make_engine(3, torch.float32, 0)
    ema, history = make_ema(), []
    for step in range(1, STEPS + 1):
        if step == RESUME_AT:
            state = ema.state_dict()  # this rank's partitions, the window's blocks among them
            ema = make_ema()
            ema.load_state_dict(state)
        train_step(engine, step, torch.float32)
        history.append(followed_weights(engine, 3))  # the fp32 masters, gathered (collective) for the check only
        with counting_collectives() as calls:
            ema.update(engine.module)
        assert calls == [], f"step {step}: ema.update communicated: {calls}"
        for label, reference in zip(LABELS, (uniform_mean(history), window_mean(history, 2, 3))):
            average = ema.ema_state_dict(label)  # gathered to rank 0 (collective)
            if rank == 0:
                for name, value in reference.items():  # fp32 averages against float64 definitions
                    torch.testing.assert_close(
                        average[name].double(), value, rtol=1e-5, atol=1e-6, msg=f"{step} {label}"
                    )
    whole = make_ema()
    whole.update(make_model())
    ratio = ema.shadow.nbytes / whole.shadow.nbytes
    assert ratio < 1 / world + 0.05, f"rank {rank}'s averages hold {ratio:.3f} of the unsharded bytes"
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
