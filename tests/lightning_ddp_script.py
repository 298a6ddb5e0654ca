"""Run under torchrun (2 CPU processes): Lightning DDP with EMACallback; each rank saves its average and steps.

``lightning_ddp_script.py OUT``: one fit. ``lightning_ddp_script.py OUT save_best``: ``save_best="average"``, two
epochs with a checkpoint each, then a second fit resumed from the first epoch's checkpoint; each rank saves both
fits' final training weights and averages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
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


def save_best(out: Path) -> None:
    def run(folder: Path, ckpt_path: Path | None = None) -> tuple[TinyModule, EMACallback]:
        module, ema = TinyModule(batchnorm=False), EMACallback(smoothing=0.8, save_best="average")
        saver = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
        trainer = make_trainer(folder, [ema, saver], devices=2, strategy="ddp", max_epochs=2)
        trainer.fit(module, loader(1, n=96), ckpt_path=ckpt_path)
        return module, ema

    whole_module, whole_ema = run(out / "whole")
    first = sorted((out / "whole").glob("epoch=0-*.ckpt"))[0]
    resumed_module, resumed_ema = run(out / "resumed", first)
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "first": first.name,
            "state_key": whole_ema.state_key,
            **{
                f"{run}_{what}": {k: v.detach().clone() for k, v in weights.items()}
                for run, (module, ema) in {
                    "whole": (whole_module, whole_ema),
                    "resumed": (resumed_module, resumed_ema),
                }.items()
                for what, weights in {"training": module.state_dict(), "average": ema.ema_model.state_dict()}.items()
            },
        },
        out / f"save_best-rank{rank}.pt",
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[2:] == ["save_best"]:
        save_best(Path(sys.argv[1]))
    else:
        main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # results written; skip gloo's teardown at interpreter exit (see sharded_ema_script.py)
