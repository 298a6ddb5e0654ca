"""A small training run for tests/test_fault_resume.py, meant to be SIGKILLed and resumed with autoresume.

Usage: python fault_train.py SAVE_FOLDER RESULT_FILE [PAUSE_LINE [THROTTLE_SECONDS]]
   or: python fault_train.py --serve


It prints one line per event it observes (``fit_start B``, ``batch_start B``, ``batch_end B``,
``epoch_end E``; B counts completed batches, E completed epochs), flushing each, so the parent
knows where the run is. When a printed line equals PAUSE_LINE, the run sleeps there, so the
parent can kill it at exactly that point. With THROTTLE_SECONDS it sleeps that long before each batch, so a parent
killing it while it runs on gets there before the run ends. A run that reaches the end writes its final training
weights, EMA weights and eval metrics with ``torch.save`` to RESULT_FILE.

The run: 40 samples in batches of 4 (10 batches an epoch), shuffled, for 3 epochs; a model with
BatchNorm and Dropout; SGD with momentum and a step LR schedule; an EMA with a 5-batch half-life;
an eval every 4 batches; a checkpoint every 3 batches, and autoresume.

``--serve`` saves the interpreter start (seconds, most of a run's time) for many runs: it imports
once, then reads one JSON line of ``main``'s keyword arguments at a time from stdin
and runs each in a forked child process that prints ``pid N`` first and is reaped with
``exited STATUS`` (the raw ``waitpid`` status). The children train nothing before the fork.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Callback, Classifier, Trainer

torch.set_num_threads(1)


class Progress(Callback):
    """Prints where the run is; sleeps at the line the parent asked for."""

    def __init__(self, pause: str | None, throttle: float) -> None:
        self.pause, self.throttle = pause, throttle

    def _say(self, event: str, count: int) -> None:
        line = f"{event} {count}"
        print(line, flush=True)
        if line == self.pause:
            time.sleep(600)  # the parent kills the run here

    def fit_start(self, state, logger) -> None:
        self._say("fit_start", state.timestamp.batch)

    def batch_start(self, state, logger) -> None:
        self._say("batch_start", state.timestamp.batch)
        time.sleep(self.throttle)

    def batch_end(self, state, logger) -> None:
        self._say("batch_end", state.timestamp.batch)

    def epoch_end(self, state, logger) -> None:
        self._say("epoch_end", state.timestamp.epoch)


def main(save_folder: str, result_file: str, pause: str | None = None, throttle: float = 0.0) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    train = DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=True)
    evaluation = DataLoader(TensorDataset(inputs[:16] + 0.1, targets[:16]), batch_size=8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model = Classifier(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    ema = EMA(half_life="5ba")
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=evaluation,
        max_duration="3ep",
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=[ema],
        callbacks=[Progress(pause, throttle)],
        eval_interval="4ba",
        seed=17,
        save_folder=save_folder,
        save_interval="3ba",
        autoresume=True,
        progress_bar=False,
    )
    trainer.fit()
    result = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in ema.ema_model.state_dict().items()},
        "ema_counters": {k: v for k, v in ema.state_dict().items() if k not in ("weights", "state_dict_keys")},
        "eval": trainer.eval(),
        "eval_history": trainer.state.eval_history,
        "timestamp": trainer.state.timestamp.state_dict(),
    }
    torch.save(result, result_file)
    print("done", flush=True)


def serve() -> None:
    # Building an optimizer imports torch._dynamo (seconds): do it once here, not in every child.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    while command := sys.stdin.readline():
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                print(f"pid {os.getpid()}", flush=True)
                main(**json.loads(command))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"exited {status}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(*sys.argv[1:4], *map(float, sys.argv[4:5]))
