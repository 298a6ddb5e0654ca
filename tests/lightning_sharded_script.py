"""Run under torchrun (2 CPU processes, gloo): EMACallback under Lightning's ModelParallelStrategy (FSDP2 through
``fully_shard`` in ``configure_model``, parameters DTensors sharded ``Shard(0)`` on the mesh dim "data_parallel").

argv: OUT CASE. Every check compares with an independent reference: the float64 closed form of the full weights
recorded after each optimizer step (gathered for the check only), a run without the callback, an uninterrupted run,
the plain module. Prints ``CASE rank R: ok`` once every check of the case passed on that rank.

- ``folder`` (the model built in ``__init__``; checkpoints are DCP folders, Lightning's default): the average equals
  the closed form; no collective inside an update (every c10d and functional collective counted by a dispatch
  mode, with a positive control); each rank holds half of the unsharded average's bytes; validation sees the
  average; training is bit for bit as without the callback; resuming from the epoch-0 folder ends bit for bit as
  the uninterrupted run (every rank's shards); ``save_ema_weights`` writes on rank 0 a file that loads into the
  plain module and equals the closed form; ``validate(ckpt_path=folder)`` with a fresh callback validates the
  saved average.
- ``end_with``: ``EMACallback(end_with="average")``: the sharded module holds the closed form after ``fit``.
- ``file`` (the model built in ``configure_model``; ``save_distributed_checkpoint=False``: one file of full tensors
  from rank 0): resuming from it ends bit for bit as the uninterrupted run; and a callback whose average started
  in a DDP fit (whole tensors) carries on, shard by shard, in a ModelParallelStrategy fit of the same module: the
  closed form over both fits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from closed_form import ClosedForm

from emakit import EMA
from emakit.integrations.lightning import EMACallback

SMOOTHING = 0.8
WIDTH, HIDDEN = 32, 256  # every tensor splits evenly in two along dim 0, with no padding in the EMA's flat buffer


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full weights in float64 on the CPU (DTensors gathered: collective)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().double().cpu().clone()
        for k, v in module.state_dict().items()
    }


class ShardedModule(pl.LightningModule):
    """A two-layer classifier, sharded by FSDP2 in ``configure_model`` where Lightning gives a device mesh."""

    def __init__(self, build_in_init: bool = True) -> None:
        super().__init__()
        self.net: nn.Module | None = self.build() if build_in_init else None
        self.seen: dict[int, dict[str, torch.Tensor]] = {}  # the weights validation ran on, by optimizer step

    @staticmethod
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WIDTH))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.net is None:
            self.net = self.build()
        if self.device_mesh is None or isinstance(self, FSDPModule):  # under DDP; or sharded by an earlier fit
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
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen[self.trainer.global_step] = full_weights(self)
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # momentum: its state must resume too


class StepRecorder(pl.Callback):
    """The full weights after each optimizer step, in order (listed before the EMA: what it averages), as ``read``
    gives them (default: :func:`full_weights`)."""

    def __init__(self, read: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self._last = 0
        self.read = read or full_weights

    def on_fit_start(self, trainer, pl_module) -> None:
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.steps.append(self.read(pl_module))


class CollectiveCounter(TorchDispatchMode):
    """Every collective dispatched inside the block: torch.distributed's (c10d) and DTensor's (functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def count_collectives_in_updates(callback: EMACallback) -> list[str]:
    calls: list[str] = []
    update = callback.ema.update

    def counted(*args, **kwargs):
        with CollectiveCounter() as counter:
            result = update(*args, **kwargs)
        calls.extend(counter.calls)
        return result

    callback.ema.update = counted  # type: ignore[method-assign]
    return calls


def loader(seed: int, n: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, WIDTH, generator=generator), torch.randint(0, WIDTH, (n,), generator=generator))
    return DataLoader(data, batch_size=8)


def make_trainer(root: Path, callbacks: list, strategy=None, **kwargs) -> pl.Trainer:
    if strategy is None:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, callbacks=callbacks, default_root_dir=root,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def closed_form(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    reference = ClosedForm(SMOOTHING)
    for weights in steps:
        reference.update(weights)
    assert reference.ema is not None
    return reference.ema


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, atol=1e-6, rtol=1e-5, msg=f"{what}: {name}")


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name} differs"


def local_shards(callback: EMACallback) -> dict[str, torch.Tensor]:
    return {k: v.to_local().clone() for k, v in callback.ema.state_dict()["weights"].items()}


def run(root: Path, callbacks: list, module: ShardedModule, ckpt_path: Path | None = None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    trainer = make_trainer(root, callbacks, **kwargs)
    trainer.fit(module, loader(1, 64), loader(2, 16), ckpt_path=ckpt_path)  # 4 optimizer steps per epoch and rank
    return trainer


def case_folder(out: Path, rank: int) -> None:
    from torch.distributed.tensor import DTensor, Shard

    recorder, ema, module = StepRecorder(), EMACallback(smoothing=SMOOTHING), ShardedModule()
    ema.ema.remember_structure(module)  # before fully_shard: for ema.ema_model
    calls = count_collectives_in_updates(ema)
    saver = pl.callbacks.ModelCheckpoint(dirpath=out / "whole", every_n_epochs=1, save_top_k=-1)
    trainer = run(out / "whole", [recorder, ema, saver], module)
    assert trainer.global_step == 8 == len(recorder.steps) == ema.ema.num_updates
    for name, p in module.named_parameters():  # really sharded, as the EMA saw it
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), (name, type(p), getattr(p, "placements", 0))
        assert p.device_mesh.mesh_dim_names == ("data_parallel",), p.device_mesh
    assert calls == [], f"collectives inside EMA updates: {calls[:5]}"
    with CollectiveCounter() as control:  # the positive control: a gather of the average is seen
        average = {k: v.double() for k, v in ema.ema.ema_state_dict().items()}
    assert control.calls, "the collective counter saw nothing: it would see nothing inside an update either"
    expected = closed_form(recorder.steps)
    assert_close(average, expected, "average after 8 steps")

    # each rank holds half of the unsharded average (the same tensors, whole, in a plain module)
    whole = EMA(smoothing=SMOOTHING)
    whole.attach(ShardedModule.build())
    ratio = ema.ema.shadow.nbytes / whole.shadow.nbytes
    assert ratio <= 0.5 * 1.01, ratio
    print(f"rank {rank}: EMA bytes {ema.ema.shadow.nbytes} of {whole.shadow.nbytes} unsharded ({ratio:.4f})")

    # validation (after epochs 1 and 2) ran on the average, not on the training weights
    for step in (4, 8):
        assert_close(module.seen[step], closed_form(recorder.steps[:step]), f"weights validated at step {step}")
        assert not torch.allclose(module.seen[step]["net.0.weight"], recorder.steps[step - 1]["net.0.weight"])
    assert_equal(full_weights(module), recorder.steps[-1], "training weights after fit")

    # the export: rank 0 writes a file of the whole average that loads into the plain module
    import safetensors.torch

    writes, save_file = [], safetensors.torch.save_file
    safetensors.torch.save_file = lambda *args, **kwargs: writes.append(save_file(*args, **kwargs))
    try:
        path = ema.save_ema_weights(out / "ema.safetensors")
    finally:
        safetensors.torch.save_file = save_file
    assert len(writes) == (rank == 0), f"rank {rank} wrote {len(writes)} files"
    dist.barrier()
    if rank == 0:
        plain = ShardedModule()
        plain.load_state_dict(load_file(path))  # strict: every key of the plain module
        assert_close(full_weights(plain), expected, "exported average")
        assert_equal({k: v.double() for k, v in plain.state_dict().items()}, average, "exported vs gathered")
    averaged = ema.ema_model.state_dict()  # a plain module of the whole average (gathered: collective)
    assert not any(hasattr(v, "full_tensor") for v in averaged.values())
    assert_equal({k: v.double() for k, v in averaged.items()}, average, "ema_model")

    # the checkpoint folder: rank 0's meta.pt holds markers, DCP holds every rank's shards
    folder = out / "whole" / "epoch=0-step=4.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file(), sorted((out / "whole").iterdir())
    meta = torch.load(folder / "meta.pt", weights_only=False)
    weights = meta["callbacks"][ema.state_key]["ema"]["weights"]
    assert all(isinstance(v, dict) and set(v) == {"__dcp_key__"} for v in weights.values()), weights

    # a fresh callback validating from the folder: its average is rank by rank the one saved at step 4
    checker, fresh = EMACallback(smoothing=SMOOTHING), ShardedModule()
    validator = make_trainer(out / "validate", [checker], enable_checkpointing=False)
    validator.validate(fresh, loader(2, 16), ckpt_path=folder)
    (validated,) = fresh.seen.values()  # trainer.validate restores no loop: its global_step stays 0
    assert_close(validated, closed_form(recorder.steps[:4]), "validated from the folder of epoch 0")

    # training without the callback: the same weights, bit for bit
    baseline = ShardedModule()
    run(out / "baseline", [], baseline, enable_checkpointing=False)
    assert_equal(full_weights(baseline), recorder.steps[-1], "training without the EMA")

    # resumed from the folder of epoch 0: the same weights and average, every rank's shards bit for bit
    resumed, resumed_module = EMACallback(smoothing=SMOOTHING), ShardedModule()
    run(out / "resumed", [resumed], resumed_module, ckpt_path=folder, enable_checkpointing=False)
    assert resumed.ema.num_updates == 8
    assert_equal(full_weights(resumed_module), recorder.steps[-1], "resumed training weights")
    assert_equal(local_shards(resumed), local_shards(ema), f"rank {rank}'s resumed EMA shards")


def case_file(out: Path, rank: int) -> None:
    # an average started under DDP (whole tensors) carries on under ModelParallelStrategy (shards of them)
    recorder, ema, module = StepRecorder(), EMACallback(smoothing=SMOOTHING), ShardedModule()
    run(out / "ddp", [recorder, ema], module, strategy="ddp", max_epochs=1, enable_checkpointing=False)
    assert not any(hasattr(p, "full_tensor") for p in module.parameters())
    calls = count_collectives_in_updates(ema)
    run(out / "sharded", [recorder, ema], module, max_epochs=1, enable_checkpointing=False)
    assert all(hasattr(p, "full_tensor") for p in module.parameters())  # sharded by configure_model
    assert ema.ema.num_updates == 8 == len(recorder.steps)
    assert calls == [], f"collectives inside EMA updates: {calls[:5]}"
    assert_close({k: v.double() for k, v in ema.ema.ema_state_dict().items()}, closed_form(recorder.steps), "carried")

    # the model built in configure_model; checkpoints as one file of full tensors: resumed bit for bit
    def fit(root: Path, ckpt_path: Path | None = None) -> tuple[EMACallback, ShardedModule]:
        callback, module = EMACallback(smoothing=SMOOTHING), ShardedModule(build_in_init=False)
        saver = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1)
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        run(root, [callback, saver], module, ckpt_path=ckpt_path, strategy=strategy)
        return callback, module

    whole, whole_module = fit(out / "whole")
    try:  # no structure remembered before sharding (the module had no network before configure_model)
        whole.ema_model  # noqa: B018
        raise AssertionError("ema_model of a sharded module without its structure was not refused")
    except ValueError as error:
        assert "remember_structure" in str(error), error
    first = out / "whole" / "epoch=0-step=4.ckpt"
    assert first.is_file(), sorted((out / "whole").iterdir())
    saved = torch.load(first, weights_only=False)["callbacks"][whole.state_key]["ema"]["weights"]
    shapes = {k: v.shape for k, v in whole_module.state_dict().items()}  # DTensors: the full shapes
    assert all(type(v) is torch.Tensor and v.shape == shapes[k] for k, v in saved.items()), saved
    resumed, resumed_module = fit(out / "resumed", ckpt_path=first)
    assert resumed.ema.num_updates == whole.ema.num_updates == 8
    assert_equal(full_weights(resumed_module), full_weights(whole_module), "resumed training weights")
    assert_equal(local_shards(resumed), local_shards(whole), f"rank {rank}'s resumed EMA shards")


def case_end_with(out: Path, rank: int) -> None:
    """``end_with="average"``: after ``fit`` the sharded module holds the average, shard by shard."""
    recorder, ema, module = StepRecorder(), EMACallback(smoothing=SMOOTHING, end_with="average"), ShardedModule()
    trainer = run(out / "end_with", [recorder, ema], module, enable_checkpointing=False)
    assert trainer.global_step == 8 == len(recorder.steps) == ema.ema.num_updates
    assert not ema.ema.swapped
    ended = full_weights(module)  # collective
    assert_close(ended, closed_form(recorder.steps), "the module after fit")
    assert not torch.equal(ended["net.0.weight"], recorder.steps[-1]["net.0.weight"]), "still the training weights"


def main(out: str, case: str) -> None:
    torch.set_num_threads(1)
    cases = {"folder": case_folder, "file": case_file, "end_with": case_end_with}
    os.makedirs(out, exist_ok=True)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    cases[case](Path(out), rank)
    print(f"{case} rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
