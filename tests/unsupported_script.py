"""Run under torchrun (1 process is enough, gloo): tensors emakit must refuse, each printed as ``CASE: message``.

FSDP1 makes its FlatParameter (and, with ``use_orig_params=True``, flat views in the original modules) in a world
of one process too (as NO_SHARD): emakit averages them given the FSDP root, and refuses them given its ``.module``
(the root unit's handle is not in it; ``tests/fsdp1_ema_script.py`` checks the other FSDP1 refusals on 2 ranks);
DTensors on a 2-D mesh or with a Partial placement need a process group only. Every case but the supported ones
(``-ok``) must raise UnsupportedTensorError at the first update; a case that does not prints ``CASE: NONE``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from emakit import EMA
from emakit.storage.unsupported import UnsupportedTensorError


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def report(case: str, model: nn.Module) -> None:
    try:
        EMA(half_life="3ba").update(model)
    except UnsupportedTensorError as error:
        print(f"{case}: {error}", flush=True)
    else:
        print(f"{case}: NONE", flush=True)


class Holder(nn.Module):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor, requires_grad=False)


def main() -> None:
    dist.init_process_group("gloo")
    for orig in (False, True):
        wrapped = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"), use_orig_params=orig)
        wrapped(torch.randn(2, 5)).sum().backward()
        report(f"fsdp1-inner-orig{orig}", wrapped.module)  # first: no EMA has seen the root's units yet
        report(f"fsdp1-wrapper-orig{orig}-ok", wrapped)
    world = dist.get_world_size()
    mesh_2d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    report("dtensor-2d", Holder(DTensor.from_local(torch.ones(4, 3), mesh_2d, [Replicate(), Shard(0)])))
    mesh_1d = init_device_mesh("cpu", (world,))
    report("dtensor-partial", Holder(DTensor.from_local(torch.ones(4, 3), mesh_1d, [Partial()])))
    report("dtensor-shard-ok", Holder(DTensor.from_local(torch.ones(4, 3), mesh_1d, [Shard(0)])))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # DTensor's caches keep the meshes alive past destroy_process_group (see sharded_ema_script.py)
