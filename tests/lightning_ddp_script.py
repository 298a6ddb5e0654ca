"""Run under torchrun (2 CPU processes): Lightning DDP with EMACallback; each rank saves its average and steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_integration_lightning import StepRecorder, TinyModule, loader

from emakit.integrations.lightning import EMACallback


def main(out: str) -> None:
    recorder, ema = StepRecorder(), EMACallback(smoothing=0.8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[recorder, ema],
    )
    trainer.fit(TinyModule(batchnorm=False), loader(1, n=96))
    rank = trainer.global_rank
    average = {k: v.detach().clone() for k, v in ema.ema_model.state_dict().items()}
    torch.save(
        {"average": average, "steps": recorder.steps, "updates": ema.ema.num_updates}, Path(out) / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # results written; skip gloo's teardown at interpreter exit (see sharded_ema_script.py)
