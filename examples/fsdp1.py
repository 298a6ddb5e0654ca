"""An EMA of the weights of a torch FSDP1 model (``FullyShardedDataParallel``), by hand.

A small MLP fits a noisy function of 16 inputs. The pattern, in order of appearance below:

- the model wrapped by FSDP1 as usual (each Linear its own unit here); the EMA needs nothing from FSDP;
- ``ema.update(model)`` once per optimizer step, on every rank, with the FSDP root module: each rank averages its
  own flat shards (``use_orig_params=False``: the FlatParameters without their padding; ``True``: each original
  parameter's slice, empty on a rank that holds none of it), with no communication: half the bytes on 2 ranks;
- evaluation inside ``with ema.ema_weights(model):`` on every rank (FSDP's forward gathers the shards, now holding
  the average); the training weights come back bit for bit on exit;
- a checkpoint: each rank's training shards and optimizer state (the simplest way; FSDP's sharded state dict with
  ``torch.distributed.checkpoint`` works too) and, beside them, each rank's ``ema.state_dict()`` (its own shards:
  it resumes on the same number of processes);
- ``ema.save_ema_weights(path)`` on every rank: each parameter gathered to rank 0, one at a time, which writes a
  safetensors file that loads into the plain model.

Run it (on CPU, 2 processes; on GPUs give FSDP ``device_id=torch.cuda.current_device()`` and use NCCL)::

    torchrun --nproc_per_node 2 examples/fsdp1.py --out runs/fsdp1
    torchrun --nproc_per_node 2 examples/fsdp1.py --use-orig-params --out runs/fsdp1-orig

    # interrupted after 20 steps, resumed from the checkpoint to 40
    torchrun --nproc_per_node 2 examples/fsdp1.py --steps 20 --out runs/a
    torchrun --nproc_per_node 2 examples/fsdp1.py --steps 40 --resume --out runs/a

``tests/test_fsdp1_ema.py`` runs this script and checks that the resumed run ends as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from emakit import EMA


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of rank ``rank`` (each rank its own data): inputs and a noisy target."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=generator)
    return x, x[:, :4].sin().sum(dim=1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=generator)


def evaluate(model: nn.Module) -> float:
    """The mean squared error on a held-out batch (the same on every rank)."""
    x, y = batch(-1, 0)
    model.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), y).item()
    model.train()
    return loss


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's training shards and optimizer state (plain tensors: FSDP holds them between steps)."""
    return {
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "optimizer": optimizer.state_dict(),
    }


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state["weights"][name])
    optimizer.load_state_dict(state["optimizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="train up to this many optimizer steps")
    parser.add_argument("--use-orig-params", action="store_true", help="FSDP1's use_orig_params=True")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint and the exported weights")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = FSDP(
        make_model(),
        device_id=torch.device("cpu"),  # on CPU FSDP1 needs it (sync_module_states stays False there)
        use_orig_params=args.use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMA(half_life="5ba")  # "ba" counts ema.update calls: optimizer steps here
    checkpoint = args.out / "checkpoint"
    start = 0
    if args.resume:
        state = torch.load(checkpoint / f"rank{rank}.pt", weights_only=True)
        load_training_state(model, optimizer, state["training"])
        ema.load_state_dict(state["ema"])  # this rank's shards: checked against the model at the next update
        start = state["step"]

    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)  # every rank, the FSDP root: each rank averages its shards, no communication
        if step % 10 == 0:
            training = evaluate(model)
            with ema.ema_weights(model):  # every rank: FSDP's forward gathers the average
                average = evaluate(model)
            if rank == 0:
                print(f"step {step}: eval loss {training:.6f} (training weights), {average:.6f} (EMA)", flush=True)

    checkpoint.mkdir(parents=True, exist_ok=True)
    state = {"step": args.steps, "training": training_state(model, optimizer), "ema": ema.state_dict()}
    torch.save(state, checkpoint / f"rank{rank}.pt")  # every rank: its own shards
    path = ema.save_ema_weights(args.out / "ema.safetensors")  # every rank calls; rank 0 writes
    dist.barrier()
    if rank == 0:
        plain = make_model()  # no FSDP: the exported file holds full tensors, keyed like its state_dict
        plain.load_state_dict(safetensors.torch.load_file(path))
        print(f"plain model with the EMA weights: eval loss {evaluate(plain):.6f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
