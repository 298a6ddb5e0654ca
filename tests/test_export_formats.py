"""``emakit export`` reads the checkpoints each integration writes (Lightning ``.ckpt``, Hugging Face
``checkpoint-N/``, accelerate ``save_state``, ``torch.save(ema.state_dict())``): the file it writes equals the live
EMA's ``save_ema_weights`` bit for bit and loads into the plain model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA


def export(checkpoint: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emakit.cli", "export", str(checkpoint), str(out), *args], capture_output=True, text=True
    )


def assert_same_file(exported: Path, live: Path) -> None:
    mine, theirs = safetensors.torch.load_file(exported), safetensors.torch.load_file(live)
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 4, generator=generator), torch.randint(0, 3, (24,), generator=generator))
    return DataLoader(data, batch_size=4)


def test_a_lightning_checkpoint_exports_its_ema_callbacks_average(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from emakit.integrations.lightning import EMACallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    callback = EMACallback(half_life="2ba")
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = pl.Trainer(
        max_steps=6, callbacks=[callback, saver], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(Module(), loader())
    live = callback.save_ema_weights(tmp_path / "live.safetensors")
    result = export(tmp_path / "last.ckpt", tmp_path / "exported.safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_file(tmp_path / "exported.safetensors", live)


def test_a_hugging_face_checkpoint_folder_exports_its_average(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from emakit.integrations.transformers import EMATrainer

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    )
    ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, save_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    ema = EMA(half_life="2ba")
    trainer = EMATrainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids], ema=ema)
    trainer.train()
    live = ema.save_ema_weights(tmp_path / "live.safetensors")
    result = export(tmp_path / "run" / "checkpoint-4", tmp_path / "exported.safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_file(tmp_path / "exported.safetensors", live)


def test_an_accelerate_save_state_folder_exports_the_registered_ema(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader())
    ema = EMA(half_life="2ba")
    accelerator.register_for_checkpointing(ema)
    for x, y in data:
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
    accelerator.save_state(str(tmp_path / "state"))
    live = ema.save_ema_weights(tmp_path / "live.safetensors")
    result = export(tmp_path / "state", tmp_path / "exported.safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_file(tmp_path / "exported.safetensors", live)


def test_a_saved_ema_state_file_exports_and_other_files_are_refused_by_name(tmp_path) -> None:
    model = net()
    ema = EMA(half_life="2ba")
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    live = ema.save_ema_weights(tmp_path / "live.safetensors")
    assert export(tmp_path / "ema.pt", tmp_path / "exported.safetensors").returncode == 0
    assert_same_file(tmp_path / "exported.safetensors", live)
    net().load_state_dict(safetensors.torch.load_file(tmp_path / "exported.safetensors"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    result = export(tmp_path / "other.pt", tmp_path / "x.safetensors")
    assert result.returncode != 0 and "holds no EMA state" in result.stderr
    partitioned = {**ema.state_dict(), "partitioning": {"engine": "deepspeed-zero3", "rank": 1, "world_size": 2}}
    torch.save(partitioned, tmp_path / "rank1.pt")
    result = export(tmp_path / "rank1.pt", tmp_path / "x.safetensors")
    assert result.returncode != 0 and "holds the EMA partitions of rank 1 of a deepspeed-zero3 run" in result.stderr
