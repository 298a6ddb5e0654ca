"""A small run for tests/test_distributed.py, launched by torchrun on 2 CPU processes (gloo), or in one process.

Usage: python -m torch.distributed.run --nproc_per_node 2 --master-port PORT distributed_train.py MODE OUT_DIR

MODE is ``ddp`` or ``fsdp`` (``parallelism``), ``fail`` (rank 1 raises at its third batch) or ``hang`` (rank 1
sleeps at its third batch, so the others wait in a collective until the process-group timeout).
Each rank of a ``ddp``/``fsdp`` run writes ``OUT_DIR/<name>-rank<R>.pt`` for each run of :data:`RUNS`: the full
(gathered) training weights, the full EMA weights, eval metrics and the clock. The single-process reference is
``main(None, out_dir, batch_size=2 * PER_RANK_BATCH)``, run without torchrun.

The model has no BatchNorm or Dropout, so a 2-rank run with per-rank batch b computes the same gradients as one
process with batch 2b (up to float rounding).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Callback, Classifier, Trainer, distributed

torch.set_num_threads(1)

PER_RANK_BATCH = 4
RUNS = {"sequential": False, "shuffled": True}  # name -> shuffle


class Inject(Callback):
    """Makes rank 1 fail (``fail``) or hang (``hang``) at the start of its third batch."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def batch_start(self, state, logger) -> None:
        if distributed.rank() != 1 or state.timestamp.batch != 2:
            return
        if self.mode == "fail":
            raise RuntimeError("injected failure on rank 1")
        if self.mode == "hang":
            time.sleep(120)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: DTensors (FSDP shards) are gathered from every rank (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def _data(shuffle: bool, batch_size: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(48, 6, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    train = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=shuffle)
    held_out = torch.randn(17, 6, generator=generator), torch.randint(0, 3, (17,), generator=generator)
    evaluation = DataLoader(TensorDataset(*held_out), batch_size=4)  # 17: rank 0 gets 3 batches, rank 1 two
    return train, evaluation


def run(
    parallelism: str | None,
    shuffle: bool,
    batch_size: int,
    callbacks: list[Callback],
    max_duration: str = "2ep",
    save_folder: Path | None = None,
    save_interval: str = "1ep",
) -> dict:
    train, evaluation = _data(shuffle, batch_size)
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)))
    ema = EMA(half_life="3ba")
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=evaluation,
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        algorithms=[ema],
        callbacks=callbacks,
        seed=5,
        progress_bar=False,
        parallelism=parallelism,
        save_folder=save_folder,
        save_interval=save_interval,
        autoresume=save_folder is not None,
    )
    trainer.fit()
    ema_state = ema.state_dict()
    ema_model = ema.ema_model  # under FSDP a plain module holding the gathered average (collective)
    return {
        "model": {k: _full(v) for k, v in model.state_dict().items()},
        "ema": {k: _full(v) for k, v in ema_state["weights"].items()},
        "ema_model": {k: v.detach().clone() for k, v in ema_model.state_dict().items()},
        "ema_model_type": type(ema_model).__name__,
        "ema_local_bytes": sum(
            (v.to_local() if hasattr(v, "to_local") else v).nbytes for v in ema_state["weights"].values()
        ),
        "eval": trainer.eval(),
        "eval_history": trainer.state.eval_history,
        "timestamp": trainer.state.timestamp.state_dict(),
        "same_model_object": trainer.state.model is model,
    }


def main(mode: str | None, out_dir: str, batch_size: int = PER_RANK_BATCH) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode in ("fail", "hang"):
        run(None, False, batch_size, [Inject(mode)])
        return
    for name, shuffle in RUNS.items():
        result = run(mode, shuffle, batch_size, [])
        torch.save(result, out / f"{name}-{mode or 'single'}-rank{distributed.rank()}.pt")
    if mode in ("ddp", "fsdp"):  # one epoch, a checkpoint (a file; for FSDP a DCP folder), then resumed to the end
        run(mode, False, batch_size, [], max_duration="1ep", save_folder=out / "checkpoints")
        result = run(mode, False, batch_size, [], save_folder=out / "checkpoints")
        torch.save(result, out / f"resumed-{mode}-rank{distributed.rank()}.pt")


def killed_then_resumed(out_dir: str, kill: bool) -> None:
    """FSDP with a checkpoint every 5 batches: killed right after batch 7 (``kill``), or resumed to the end."""
    out = Path(out_dir)
    callbacks = [KillAfter(7 if kill else -1)]  # the same callbacks in both runs: their states are checkpointed
    result = run("fsdp", False, PER_RANK_BATCH, callbacks, save_folder=out / "killed", save_interval="5ba")
    torch.save(result, out / f"killed-resumed-fsdp-rank{distributed.rank()}.pt")


class KillAfter(Callback):
    """Ends every rank's process at once, as SIGKILL would (no cleanup), after batch ``batch``."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_checkpoint(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            os._exit(9)


if __name__ == "__main__":
    if sys.argv[1] in ("fsdp-kill", "fsdp-resume"):
        killed_then_resumed(sys.argv[2], kill=sys.argv[1] == "fsdp-kill")
    else:
        main(sys.argv[1], sys.argv[2])
