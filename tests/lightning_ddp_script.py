"""Run under torchrun (2 CPU processes): Lightning DDP with EMACallback; each rank saves its average and steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from test_integration_lightning import StepRecorder, TinyModule, loader, make_trainer

from emakit.integrations.lightning import EMACallback


def main(out: str) -> None:
    recorder, ema = StepRecorder(), EMACallback(smoothing=0.8)
    trainer = make_trainer(
        Path(out), [recorder, ema], devices=2, strategy="ddp", max_epochs=1, enable_checkpointing=False
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
