"""An EMA of the weights in a Hugging Face Accelerate training loop.

A small MLP learns scikit-learn's digits on CPU. The pattern, in order of appearance below:

- ``accelerator.prepare(model, optimizer, loader)`` as usual; the EMA needs no preparing (``ema.update``
  accepts the DDP-wrapped model and keys the average like the plain model);
- ``accelerator.register_for_checkpointing(ema)``: ``save_state`` / ``load_state`` carry the average and
  its counters, so a resumed run continues exactly;
- gradient accumulation with ``accelerator.accumulate(model)``, and ``ema.update(model)`` only when
  ``accelerator.sync_gradients`` is true: once per optimizer step, not per micro-batch;
- evaluation inside ``with ema.ema_weights(model):``, which gives the training weights back on exit;
- at the end, ``accelerator.wait_for_everyone()`` and the main process saves the average.

Run it::

    python examples/accelerate_loop.py --out runs/digits
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --out runs/digits
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --out runs/digits

    # interrupted and resumed: save at optimizer step 100, then continue from there to step 200
    python examples/accelerate_loop.py --out runs/digits --steps 100 --save-at 100
    python examples/accelerate_loop.py --out runs/digits --steps 200 --resume

(``--multi_gpu`` only picks Accelerate's torchrun launcher: ``Accelerator(cpu=True)`` keeps both processes on CPU,
with gloo. ``accelerate launch --cpu --num_processes 2`` starts several processes only through ``mpirun``.)

Every rank writes ``OUT/result-rank{R}.pt`` (training weights, EMA state, and with ``--record`` the
weights after every optimizer step) for ``tests/test_example_accelerate.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA
from emakit.tracked import unwrap

HALF_LIFE = "10ba"  # in optimizer steps: each ema.update(model) below counts one
BATCH_SIZE = 32  # per process


class Progress:
    """Where the loop is, checkpointed with the rest: anything with ``state_dict`` / ``load_state_dict`` can be."""

    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of the current epoch already trained on

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


def digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=200, help="train until this many optimizer steps")
    parser.add_argument("--save-at", type=int, default=None, help="save_state into OUT/state after this step")
    parser.add_argument("--resume", action="store_true", help="load_state from OUT/state and continue")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--record", action="store_true", help="keep the weights after each optimizer step")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=args.accumulate,
        # a shuffle that depends only on the seed and the epoch: a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    set_seed(0)
    train_data, test_data = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(train_data, batch_size=BATCH_SIZE, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    ema = EMA(half_life=HALF_LIFE)
    progress = Progress()
    # Saved as custom_checkpoint_0.pkl, custom_checkpoint_1.pkl, ... in this order: register the same objects
    # in the same order before load_state.
    accelerator.register_for_checkpointing(ema, progress)
    if args.resume:
        accelerator.load_state(args.out / "state")  # model, optimizer, RNG states, accumulation step, ema, progress

    recorded = []
    while progress.optimizer_steps < args.steps:
        loader.set_epoch(progress.epoch)
        # a resumed run skips the micro-batches of this epoch it trained on before the save
        batches = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()  # a no-op on micro-batches that only accumulate
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            # an optimizer step happened: update the average once
            ema.update(model)
            progress.optimizer_steps += 1
            if args.record:
                recorded.append({k: v.clone() for k, v in unwrap(model).state_dict().items()})
            if progress.optimizer_steps == args.save_at:
                accelerator.save_state(args.out / "state")
            if progress.optimizer_steps == args.steps:
                break
        else:  # the epoch is done
            progress.epoch += 1
            progress.batches_in_epoch = 0

    training_accuracy = accuracy(model, test_data)
    with ema.ema_weights(model):  # inside, the model holds the average
        ema_accuracy = accuracy(model, test_data)
    accelerator.print(f"test accuracy after {progress.optimizer_steps} steps: training weights {training_accuracy:.3f},"
                      f" EMA {ema_accuracy:.3f}")  # fmt: skip

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.save_ema_weights(args.out / "ema.safetensors")  # loads into a plain nn.Sequential like the one above
    torch.save(
        {
            "weights": unwrap(model).state_dict(),
            "ema": ema.state_dict(),
            "recorded": recorded,
            "accuracy": {"training": training_accuracy, "ema": ema_accuracy},
        },
        args.out / f"result-rank{accelerator.process_index}.pt",
    )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
    sys.stdout.flush()
    os._exit(0)  # everything is written: skip interpreter teardown, where a gloo thread can crash a 2-process run
