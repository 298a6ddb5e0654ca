"""Run under torchrun with 2 processes (gloo, CPU): PostHocEMA of an FSDP2-sharded model, for test_posthoc_sharded.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 posthoc_fsdp_script.py MODE OUT_DIR

``snapshots``: a model sharded by hand with ``fully_shard`` (float64, uneven shards, a BatchNorm's plain buffers
beside the sharded parameters) trains 12 steps; a PostHocEMA updates every 2 steps and writes snapshots every 4
into ``OUT_DIR/snapshots``. Rank 0 writes ``OUT_DIR/records.pt``: the full (gathered) weights after every step,
the model's state_dict keys, and whether the averages were held as shards (DTensors). ``snapshots-fsdp1-flat`` and
``snapshots-fsdp1-orig``: the same model wrapped in torch's FSDP1 per Linear (``use_orig_params`` False: the averages
are of FlatParameter shards; True: of its 1-D views); sharded means each rank holds at most 60% of the averages.

``trainer``: the Trainer with ``parallelism="fsdp"`` runs 3 epochs uninterrupted (snapshots in ``OUT_DIR/whole``),
then 1 epoch with a (DCP) checkpoint and a run resumed from it to 3 epochs (snapshots in ``OUT_DIR/resumed``).
Each rank writes ``OUT_DIR/trainer-<run>-rank<R>.pt``: the PostHocEMA's averages gathered to full tensors and
the full weights after every batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from emakit import Callback, Classifier, PostHocEMA, Trainer
from emakit.tracked import unwrap

torch.set_num_threads(1)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered from every rank (a collective)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: _full(value) for key, value in unwrap(model).state_dict().items()}


def snapshots(out: Path, engine: str = "fsdp2") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    # 32 rows split 16/16, 5 rows 3/2; the BatchNorm's running statistics stay plain tensors (rank 0's are saved)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 5)).double()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if engine == "fsdp2":
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:  # FSDP1, one unit per Linear (FlatParameters padded to an even split), the BatchNorm in the root's
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"),
            use_orig_params=engine == "fsdp1-orig",
        )  # fmt: skip
    phema = PostHocEMA(
        sigma_rels=(0.05, 0.10), snapshot_interval="4ba", update_interval="2ba", folder=out / "snapshots"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(1)
    history = {}
    for step in range(1, 13):
        x = torch.randn(16, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 5, (16,), generator=generator)
        nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()
        optimizer.zero_grad()
        history[step] = _full_state(model)  # collective
        phema.update(model)  # collective when a snapshot is due
    averages = phema.shadows[0].state_dict()
    if engine == "fsdp2":
        sharded = all(
            isinstance(averages[phema.shadows[0].state_dict_keys[k]], DTensor) for k in ("0.weight", "3.bias")
        )
    else:
        sharded = 0 < phema.shadows[0].nbytes <= 0.6 * full_bytes + 32 * 8 * 2  # + the BatchNorm's buffers, whole
    keys = list(model.state_dict())  # every rank: FSDP1's state_dict gathers (a collective)
    if rank == 0:
        torch.save({"history": history, "keys": keys, "sharded": sharded}, out / "records.pt")
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


class Recorder(Callback):
    """The full weights after every batch (gathered: a collective at every batch end)."""

    def __init__(self) -> None:
        self.history: dict[int, dict[str, torch.Tensor]] = {}

    def batch_end(self, state, logger) -> None:
        self.history[state.timestamp.batch] = _full_state(state.model)


def _train(folder: Path, duration: str, **kwargs) -> tuple[PostHocEMA, Recorder]:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(48, 6, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)  # 6 batches per epoch and rank
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
    phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="4ba", update_interval="3ba", folder=folder)
    recorder = Recorder()
    trainer = Trainer(
        model,
        loader,
        duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        algorithms=[phema],
        callbacks=[recorder],
        seed=5,
        progress_bar=False,
        parallelism="fsdp",
        **kwargs,
    )
    trainer.fit()
    return phema, recorder


def trainer(out: Path) -> None:
    rank = int(os.environ["RANK"])
    runs = {
        "whole": _train(out / "whole", "3ep"),
        "first": _train(out / "resumed", "1ep", save_folder=out / "checkpoints", save_interval="1ep"),
        "resumed": _train(out / "resumed", "3ep", load_path=out / "checkpoints" / "ep1-ba6.dcp"),
    }
    for name, (phema, recorder) in runs.items():
        averages = [{key: _full(value) for key, value in shadow.state_dict().items()} for shadow in phema.shadows]
        record = {"averages": averages, "history": recorder.history, "steps": phema.steps}
        torch.save(record, out / f"trainer-{name}-rank{rank}.pt")
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1].startswith("snapshots-"):
        snapshots(Path(sys.argv[2]), engine=sys.argv[1].removeprefix("snapshots-"))
    else:
        {"snapshots": snapshots, "trainer": trainer}[sys.argv[1]](Path(sys.argv[2]))
    # DTensor's caches keep the device meshes, and with them the gloo group, alive past destroy_process_group; a
    # gloo thread that still releases a finished collective's tensors aborts a finalizing interpreter. Everything
    # is written: leave without finalizing (as tests/sharded_ema_script.py does).
    sys.stdout.flush()
    os._exit(0)
