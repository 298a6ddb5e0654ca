"""Run under torchrun with 2 processes: uniform and windowed averages where the average is split across ranks.

- an FSDP2-sharded model (each rank holds half of each parameter): the averages hold local shards only;
- a model every rank holds whole, with ``shard_over_ranks=True`` (each rank keeps 1/2 of each average).

Both train on the same batches as a plain model (FSDP2: each rank its half of the batch, the same gradients up to
rounding), and every average, gathered, must equal its float64 definition over the weights of the update steps;
a state saved at a block boundary or mid-block and loaded by fresh EMAs must continue and export.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from closed_form import uniform_mean, window_mean

from emakit import EMA

STEPS, RESUME_AT = 13, (6, 9)  # after 6 updates: a block boundary (blocks of 2); after 9: mid-block


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def make_ema(**options) -> EMA:
    return EMA(average=["uniform", "window"], window="6ba", window_blocks=3, **options)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, index: int, part: slice) -> None:
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(index))
    model(inputs[part]).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def check(ema: EMA, history: list[dict[str, torch.Tensor]], rank: int, what: str) -> None:
    for label, reference in (("uniform", uniform_mean(history)), ("window@6ba", window_mean(history, 2, 3))):
        average = ema.ema_state_dict(label)  # gathered (collective)
        if rank == 0:
            for name, value in reference.items():
                torch.testing.assert_close(average[name].double(), value, rtol=1e-4, atol=1e-5, msg=f"{what} {label}")


def run(sharded: bool, rank: int, world: int) -> None:
    what = "fsdp2" if sharded else "shard_over_ranks"
    model, plain = make_model(), make_model()
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world) if sharded else slice(None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.2)
    ema, history = make_ema(shard_over_ranks=not sharded), []
    for index in range(STEPS):
        if index in RESUME_AT:
            state = ema.state_dict()  # this rank's shards or slice
            ema = make_ema(shard_over_ranks=not sharded)
            ema.load_state_dict(state)
        step(model, optimizer, index, part)
        step(plain, plain_optimizer, index, slice(None))
        ema.update(model)
        history.append({k: v.detach().double() for k, v in plain.state_dict().items()})
        check(ema, history, rank, what)
    assert ema.shadow.nbytes < sum(p.numel() * 4 for p in plain.parameters()) * 0.75, "the average is not split"
    print(f"rank {rank}: {what} ok", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for sharded in (True, False):
        run(sharded, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
