"""Run by test_integration_transformers.py under torchrun (2 CPU processes, gloo): EMATrainer with DDP.

Each rank writes, into the folder given as argv[1], the EMA state, the weights after every optimizer step and its
evaluation metrics, as ``rank{N}.pt``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from test_integration_transformers import Recorder, make_args, make_data, make_model

from emakit import EMA
from emakit.integrations.transformers import EMATrainer


def main() -> None:
    out = sys.argv[1]
    recorder, ema = Recorder(), EMA(half_life="4ba")
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(out, max_steps=6, save_strategy="steps", save_steps=6, ddp_backend="gloo"),
        train_dataset=make_data(48, seed=1),
        eval_dataset=make_data(16, seed=2),
        callbacks=[recorder],
        ema=ema,
        eval_weights="both",
    )
    trainer.train()
    assert trainer.args.world_size == 2 and type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    metrics = trainer.evaluate()
    rank = dist.get_rank()
    torch.save(
        {"ema": ema.state_dict(), "steps": recorder.steps, "metrics": metrics, "model": trainer.model.state_dict()},
        f"{out}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
