"""Run under torchrun, one process per CUDA device: DDP on NCCL with an EMA (argv: out folder, 1 for async updates).

Each rank records the weights after every optimizer step (float64, on the CPU) and its average at the end.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emakit import EMA


def main(out: str, asynchronous: bool) -> None:
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 7)).to(device)
    wrapped = DistributedDataParallel(model, device_ids=[device.index])
    ema = EMA(half_life="4ba", async_update=asynchronous)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(10 + rank)
    steps = []
    for _ in range(10):
        optimizer.zero_grad()
        wrapped(torch.randn(16, 33, generator=generator).to(device)).square().mean().backward()
        optimizer.step()
        ema.update(wrapped)
        steps.append({k: v.detach().double().cpu() for k, v in model.state_dict().items()})
    average = {k: v.double().cpu() for k, v in ema.ema_state_dict().items()}
    torch.save({"steps": steps, "average": average}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
