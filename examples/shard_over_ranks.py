"""An EMA split over the ranks of data parallelism: ``EMA(shard_over_ranks=True)`` in emakit's DDP Trainer.

Every rank holds the whole model (DDP), but keeps and updates only 1/N of the average: a contiguous slice of the
parameters laid end to end. Evaluation all-gathers the average into the model (and puts the training weights back),
checkpoints hold every rank's slice (gathered into the one file rank 0 writes; each rank loads its own back), and
``save_ema_weights`` gathers the average to rank 0, one tensor at a time. Run it on 2 CPU processes::

    torchrun --nproc_per_node 2 examples/shard_over_ranks.py --out /tmp/sor --steps 24
    torchrun --nproc_per_node 2 examples/shard_over_ranks.py --out /tmp/sor-split --steps 12
    torchrun --nproc_per_node 2 examples/shard_over_ranks.py --out /tmp/sor-split --steps 24   # resumes at 12

The second and third runs end with the same average as the first, bit for bit (``tests/test_shard_over_ranks.py``
checks it). ``--whole`` keeps the whole average on every rank instead, to compare. Each rank prints the bytes its
average holds; rank 0 prints the evaluation with the average swapped in, and the same evaluation of a plain model
loaded with the exported file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, Trainer, distributed


def make_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4)))


def data() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 20, generator=generator)
    targets = (inputs[:, :4].argmax(dim=1) + (inputs[:, 4] > 1).long()) % 4
    held_out = torch.randn(64, 20, generator=generator)
    held_out_targets = (held_out[:, :4].argmax(dim=1) + (held_out[:, 4] > 1).long()) % 4
    return (
        DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=True),
        DataLoader(TensorDataset(held_out, held_out_targets), batch_size=16),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps (the run resumes from --out)")
    parser.add_argument("--whole", action="store_true", help="keep the whole average on every rank (to compare)")
    args = parser.parse_args()
    train, evaluation = data()
    model = make_model()
    ema = EMA(half_life="3ba", shard_over_ranks=not args.whole)
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=evaluation,
        max_duration=f"{args.steps}ba",
        eval_interval=f"{args.steps}ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        algorithms=[ema],
        parallelism="ddp",
        seed=3,
        save_folder=args.out / "checkpoints",
        save_interval="12ba",
        autoresume=True,  # continue from the newest checkpoint in save_folder
        progress_bar=False,
    )
    trainer.fit()
    rank = distributed.rank()
    print(f"rank {rank}: the EMA holds {ema.shadow.nbytes} bytes (split over ranks: {ema.state_is_per_rank})")
    swapped = trainer.eval()  # the average swapped in, every rank evaluating its share of the batches
    path = ema.save_ema_weights(args.out / "ema.safetensors")  # gathered to rank 0, which writes
    distributed.barrier()
    if distributed.is_main():
        plain = make_model()
        plain.load_state_dict(safetensors.torch.load_file(path))  # the plain model holding the average
        plain.eval()
        with torch.no_grad():
            losses = [nn.functional.cross_entropy(plain.module(x), y, reduction="sum") for x, y in evaluation]
        loss = float(sum(losses)) / len(evaluation.dataset)
        print(f"step {args.steps}: eval loss with the EMA swapped in {swapped['loss']:.6f}")
        print(f"step {args.steps}: plain model with the exported EMA weights: eval loss {loss:.6f}")


if __name__ == "__main__":
    main()
