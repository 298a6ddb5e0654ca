"""Run under torchrun, one process per CUDA device (2): EMACallback under Lightning's DeepSpeedStrategy (argv: OUT
STAGE, ZeRO stage 2 or 3). Lightning 2.6 runs DeepSpeed on CUDA only (``tests/test_lightning_sharded.py`` pins its
refusal of the CPU), so these checks run on GPUs.

Against the float64 closed form of the fp32 master weights (what the average follows; gathered for the check only),
a run without the callback and an uninterrupted run: the average after 8 optimizer steps; no collective inside an
update (every c10d and functional collective counted, with a positive control); under ZeRO-3 each rank holding half
the unsharded average's bytes; validation on the average (the module's weights gathered at validation start);
training bit for bit as without the callback; resume from the epoch-0 checkpoint folder bit for bit (every rank's
partitions: under ZeRO-3 the callback saves the average whole from rank 0 and each rank takes its partitions back);
the exported file loads into the plain module and equals the closed form. Prints ``zeroS rank R: ok``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from lightning.pytorch.strategies import DeepSpeedStrategy
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/
from lightning_sharded_script import (
    SMOOTHING,
    CollectiveCounter,
    StepRecorder,
    assert_close,
    assert_equal,
    closed_form,
    count_collectives_in_updates,
    loader,
)

from emakit import EMA
from emakit.integrations.lightning import EMACallback

WIDTH, HIDDEN = 32, 256


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WIDTH))


def master_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weights, whole, in float64 on the CPU (collective)."""
    return {name: safe_get_full_fp32_param(p).detach().double().cpu() for name, p in module.named_parameters()}


def module_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights, whole (gathered under ZeRO-3: collective)."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {name: p.detach().double().cpu().clone() for name, p in module.named_parameters()}


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build()
        self.seen: dict[int, dict[str, torch.Tensor]] = {}  # the weights validation ran on, by optimizer step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_validation_epoch_start(self) -> None:  # after the callbacks' (the EMA swapped in)
        self.seen[self.trainer.global_step] = module_weights(self)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(root: Path, stage: int, callbacks: list, ckpt_path: Path | None = None, **kwargs) -> tuple[pl.Trainer, Module]:
    config = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},  # every tensor partitioned
        "train_micro_batch_size_per_gpu": 8,
        "zero_allow_untested_optimizer": True,
    }
    trainer = pl.Trainer(
        accelerator="gpu", devices=2, strategy=DeepSpeedStrategy(config=config), callbacks=callbacks, max_epochs=2,
        default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip
    module = Module()
    trainer.fit(module, loader(1, 64), loader(2, 16), ckpt_path=ckpt_path)  # 4 optimizer steps per epoch and rank
    return trainer, module


def partitions(callback: EMACallback) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in callback.ema.state_dict()["weights"].items()}


def main(out: Path, stage: int) -> None:
    recorder, ema = StepRecorder(read=master_weights), EMACallback(smoothing=SMOOTHING)
    calls = count_collectives_in_updates(ema)
    saver = pl.callbacks.ModelCheckpoint(dirpath=out / "whole", every_n_epochs=1, save_top_k=-1)
    trainer, module = fit(out / "whole", stage, [recorder, ema, saver])
    rank = trainer.global_rank
    assert trainer.global_step == 8 == len(recorder.steps) == ema.ema.num_updates
    zero3 = stage == 3
    assert all(hasattr(p, "ds_id") == zero3 for p in module.parameters()), "ZeRO-3 partitions, whole under ZeRO-2"
    assert calls == [], f"collectives inside EMA updates: {calls[:5]}"
    with CollectiveCounter() as control:
        average = {k: v.double().cpu() for k, v in ema.ema.ema_state_dict().items()}  # rank 0 only under ZeRO-3
    assert control.calls, "the collective counter saw nothing: it would see nothing inside an update either"
    expected = closed_form(recorder.steps)
    if rank == 0 or not zero3:
        assert_close(average, expected, "average after 8 steps")

    whole = EMA(smoothing=SMOOTHING)
    whole.attach(build())
    ratio = ema.ema.shadow.nbytes / whole.shadow.nbytes
    assert ratio <= (0.5 * 1.01 if zero3 else 1.0), ratio
    print(f"zero{stage} rank {rank}: EMA bytes {ema.ema.shadow.nbytes} of {whole.shadow.nbytes} ({ratio:.4f})")

    for step in (4, 8):
        assert_close(module.seen[step], closed_form(recorder.steps[:step]), f"weights validated at step {step}")
        assert not torch.allclose(module.seen[step]["net.0.weight"], recorder.steps[step - 1]["net.0.weight"])
    assert_equal(master_weights(module), recorder.steps[-1], "training weights after fit")

    path = ema.save_ema_weights(out / "ema.safetensors")
    dist.barrier()
    if rank == 0:
        plain = Module()
        plain.load_state_dict(load_file(path))
        assert_close({k: v.double() for k, v in plain.state_dict().items()}, expected, "exported average")

    folder = out / "whole" / "epoch=0-step=4.ckpt"
    assert folder.is_dir(), sorted((out / "whole").iterdir())
    if zero3:  # the callback's state (written by rank 0 alone) holds the average whole
        states = list(folder.rglob("mp_rank_00_model_states.pt"))
        assert len(states) == 1, sorted(folder.rglob("*"))
        saved = torch.load(states[0], weights_only=False)["callbacks"][ema.state_key]["ema"]
        assert saved["partitioning"] is None, saved["partitioning"]
        shapes = {name: p.ds_shape for name, p in module.named_parameters()}
        assert {name: value.shape for name, value in saved["weights"].items()} == shapes, saved["weights"]

    _, baseline = fit(out / "baseline", stage, [], enable_checkpointing=False)
    assert_equal(master_weights(baseline), recorder.steps[-1], "training without the EMA")

    resumed = EMACallback(smoothing=SMOOTHING)
    _, resumed_module = fit(out / "resumed", stage, [resumed], ckpt_path=folder, enable_checkpointing=False)
    assert resumed.ema.num_updates == 8
    assert_equal(master_weights(resumed_module), recorder.steps[-1], "resumed training weights")
    assert_equal(partitions(resumed), partitions(ema), f"rank {rank}'s resumed EMA")
    print(f"zero{stage} rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
