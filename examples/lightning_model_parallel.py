"""An EMA of a LightningModule sharded with FSDP2 under Lightning's ``ModelParallelStrategy``, on 2 processes.

The pattern, in order of appearance below:

- ``configure_model`` builds the network (there, it can be built for one shard's memory: Lightning calls it under
  its init context) and shards it with ``fully_shard`` on the "data_parallel" dimension of ``self.device_mesh``;
- ``EMACallback`` needs nothing more: each rank averages its own shards (half the average's bytes on 2 ranks), with
  no communication per update; validation runs with the average swapped in, shard by shard;
- checkpoints are Lightning's folders (``torch.distributed.checkpoint``): every rank writes its shards of the
  model, of the optimizer state and of the average; ``--resume`` continues from ``last.ckpt`` exactly;
- ``ema.save_ema_weights(path)`` on every rank gathers the average to rank 0, one tensor at a time, and rank 0
  writes a safetensors file that loads into the plain (unsharded) module.

Run it (CPU; on GPUs change ``--accelerator``)::

    torchrun --nproc_per_node 2 examples/lightning_model_parallel.py --epochs 4 --out runs/mp
    python examples/lightning_model_parallel.py --epochs 4 --out runs/mp   # Lightning starts the second process

    # interrupted after 2 epochs, resumed from the last checkpoint to 4
    torchrun --nproc_per_node 2 examples/lightning_model_parallel.py --epochs 2 --out runs/a
    torchrun --nproc_per_node 2 examples/lightning_model_parallel.py --epochs 4 --resume --out runs/a

``tests/test_lightning_sharded.py`` runs it both ways and checks that the resumed run exports the same average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit.integrations.lightning import EMACallback


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None  # built in configure_model

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        if self.device_mesh is None or isinstance(self, FSDPModule):  # not under ModelParallelStrategy; or sharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def dataset(seed: int, size: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 16, generator=generator)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.3 * torch.randn(size, 1, generator=generator)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_model_parallel"))
    args = parser.parse_args()

    train, val = DataLoader(dataset(1, 512), batch_size=32), DataLoader(dataset(2, 128), batch_size=32)
    ema = EMACallback(half_life="10ba")  # in optimizer steps
    saver = pl.callbacks.ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=2, max_epochs=args.epochs, callbacks=[ema, saver],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    module = Regressor()
    trainer.fit(module, train, val, ckpt_path=args.out / "checkpoints" / "last.ckpt" if args.resume else None)

    swapped = trainer.validate(module, val, verbose=False)[0]["val_loss"]  # the average, swapped in shard by shard
    path = ema.save_ema_weights(args.out / "ema.safetensors")  # every rank calls; rank 0 writes
    if trainer.is_global_zero:
        plain = Regressor()
        plain.configure_model()  # builds the network; no device mesh here: left unsharded
        plain.load_state_dict(load_file(path))
        x, y = val.dataset.tensors
        with torch.no_grad():
            loss = nn.functional.mse_loss(plain(x), y).item()
        print(f"step {trainer.global_step}: validation with the EMA swapped in: loss {swapped:.6f}")
        print(f"plain module with the exported EMA weights: loss {loss:.6f}")
        print(f"EMA bytes on rank 0: {ema.ema.shadow.nbytes} ({ema.ema.num_updates} updates)")
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()  # ended before exit: gloo's threads can abort a process at teardown


if __name__ == "__main__":
    main()
