"""``emakit merge`` / ``emakit.merge``: checkpoints written by each trainer, merged, against a float64 reference.

Each writer is the real library: emakit's Trainer, Lightning's ``ModelCheckpoint``, the Hugging Face ``Trainer``
(``checkpoint-N/`` folders), accelerate's ``save_state``, torch's DCP (``dcp.save`` of ``{"state_dict": ...}``, the
layout Lightning's ModelParallelStrategy writes), ``torch.save`` and safetensors files. The reference reads each
checkpoint with the library's own loader and sums ``c_k * theta_k`` in float64 with coefficients written out here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit.merging import coefficients

THIRDS = [1 / 3] * 3
EMA_ONE = [0.25, 0.25, 0.5]  # ema:1 over 3 checkpoints: m1 = a, m2 = (a + b) / 2, m3 = (m2 + c) / 2


def reference(states: list[dict[str, torch.Tensor]], c: list[float]) -> dict[str, torch.Tensor]:
    return {
        key: sum(ck * state[key].double() for ck, state in zip(c, states)) if value.is_floating_point() else value
        for key, value in states[-1].items()
    }


def assert_merged(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        assert merged[key].dtype == (dtype if value.is_floating_point() else value.dtype), key
        # the float64 sum rounded once to the written dtype
        torch.testing.assert_close(merged[key], value.to(merged[key].dtype), rtol=1e-6, atol=1e-7, msg=key)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(24, 4, generator=generator), torch.randint(0, 3, (24,), generator=generator)),
        batch_size=4,
    )


def test_coefficients_are_the_documented_formulas() -> None:
    assert coefficients("uniform", [None] * 4) == [0.25] * 4
    assert coefficients("ema:1", [None] * 3) == EMA_ONE
    # half-life 100 steps, checkpoints 100 and 300 steps apart: s = 2^-1, then 2^-2
    assert coefficients("ema:100ba", [100, 200, 400]) == pytest.approx([0.5 * 0.25, 0.5 * 0.25, 0.75])
    assert coefficients("wsm:linear", [1, 2, 3, 4, 5]) == pytest.approx([0, 0.25, 0.25, 0.25, 0.25])
    # cosine over k = 2 steps: w = (1, 1/2), c = (0, 1/2, 1/2); 1-sqrt over k = 4: w_i = 1 - sqrt((i - 1) / 4)
    assert coefficients("wsm:cosine", [None] * 3) == pytest.approx([0, 0.5, 0.5])
    w = [1 - math.sqrt(i / 4) for i in range(4)] + [0]
    assert coefficients("wsm:1-sqrt", [None] * 5) == pytest.approx([0] + [w[i] - w[i + 1] for i in range(4)])
    for scheme in ("uniform", "ema:3", "wsm:cosine", "wsm:1-sqrt"):
        assert sum(coefficients(scheme, [10, 20, 30, 40])) == pytest.approx(1)


@pytest.mark.parametrize(
    ("weights", "steps", "match"),
    [
        ("ema:100ba", [100, None], r"checkpoints \[1\] do not say theirs"),
        ("ema:100ba", [200, 100], "must increase: list them oldest first"),
        ("ema:-2", [None, None], "the half-life must be a number > 0"),
        ("wsm:step", [1, 2], "the WSM decay must be one of"),
        ("wsm:linear", [1], "needs at least 2 checkpoints"),
        ("wsm:cosine", [300, 200, 400], "must increase: list them oldest first"),
        ("0.5,0.6", [None, None], "summing to 1"),
        ("softmax", [None], "expected 'uniform', 'ema:HALF_LIFE'"),
    ],
)
def test_bad_weights_are_named(weights, steps, match) -> None:
    with pytest.raises(ValueError, match=match):
        coefficients(weights, steps)


def test_emakit_trainer_checkpoints_merge_with_their_steps(tmp_path) -> None:
    model = emakit.Classifier(net())
    trainer = emakit.Trainer(
        model, loader(), "6ba", optimizers=torch.optim.SGD(model.parameters(), lr=0.5), save_folder=tmp_path,
        save_interval="2ba", progress_bar=False,
    )  # fmt: skip
    trainer.fit()
    paths = sorted(tmp_path.glob("*.pt"), key=lambda p: int(p.stem.split("ba")[-1]))
    assert [p.name for p in paths] == ["ep0-ba2.pt", "ep0-ba4.pt", "ep0-ba6.pt"]
    states = [torch.load(p, weights_only=True)["model"] for p in paths]
    # a half-life of 2 steps, checkpoints 2 steps apart: s = 1/2 as with ema:1
    assert_merged(emakit.merge(paths, "ema:2ba"), reference(states, EMA_ONE))
    assert_merged(emakit.merge(paths, "uniform"), reference(states, THIRDS))
    assert states[-1]["module.1.num_batches_tracked"].item() == 6  # integers: the last checkpoint's
    assert emakit.merge(paths)["module.1.num_batches_tracked"].item() == 6


def test_lightning_checkpoints_merge_into_the_plain_model(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        max_steps=6, callbacks=[saver], logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(Module(), loader())
    paths = [tmp_path / f"step={s}.ckpt" for s in (2, 4, 6)]
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    expected = reference([{k[len("model.") :]: v for k, v in s.items()} for s in states], EMA_ONE)
    merged = emakit.merge(paths, "ema:2ba", prefix="model.")  # Lightning's global_step: 2, 4, 6
    assert_merged(merged, expected)
    net().load_state_dict(merged)  # keyed like the plain model


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    return transformers, transformers.GPT2LMHeadModel(config)


def test_hugging_face_checkpoints_merge_into_a_from_pretrained_folder(tmp_path) -> None:
    transformers, model = tiny_gpt2()
    generator = torch.Generator().manual_seed(2)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (24, 8), generator=generator)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps", logging_strategy="no",
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    folders = [tmp_path / "run" / f"checkpoint-{s}" for s in (2, 4, 6)]
    states = [safetensors.torch.load_file(f / "model.safetensors") for f in folders]
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "emakit.cli", "merge", *map(str, folders), "--weights", "wsm:linear", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "merged 3 checkpoints (wsm:linear)" in result.stdout
    merged = safetensors.torch.load_file(out / "model.safetensors")
    assert_merged(merged, reference(states, [0.0, 0.5, 0.5]))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)  # config.json came along
    for key, value in merged.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert json.loads((out / "config.json").read_text())["n_embd"] == 16


def test_accelerate_save_state_folders_merge(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader())
    folders = []
    for step, (x, y) in enumerate(data, start=1):
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            folders.append(tmp_path / f"state-{step}")
            accelerator.save_state(str(folders[-1]))
    states = [safetensors.torch.load_file(f / "model.safetensors") for f in folders]
    assert_merged(emakit.merge(folders, "ema:1"), reference(states, EMA_ONE))
    with pytest.raises(ValueError, match=r"do not say theirs"):  # accelerate records no step
        emakit.merge(folders, "ema:2ba")


def test_dcp_folders_torch_files_and_safetensors_merge_and_mismatches_are_named(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    states = []
    for k in range(3):
        torch.manual_seed(k)
        states.append({key: value.clone() for key, value in net().state_dict().items()})
    dcp_folders, files = [], []
    for k, state in enumerate(states):
        dcp_folders.append(tmp_path / f"dcp-{k}")
        dcp.save({"state_dict": state, "optimizer": {}}, checkpoint_id=str(dcp_folders[-1]), no_dist=True)
        files.append(tmp_path / f"weights-{k}.pt")
        torch.save(state, files[-1])
    expected = reference(states, [0.2, 0.3, 0.5])
    assert_merged(emakit.merge(dcp_folders, [0.2, 0.3, 0.5]), expected)
    assert_merged(emakit.merge(files, "0.2,0.3,0.5"), expected)
    safetensors.torch.save_file(states[0], tmp_path / "a.safetensors")
    bf16 = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in states[1].items()}
    safetensors.torch.save_file(bf16, tmp_path / "b.safetensors")
    merged = emakit.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])  # written as the last one's dtype
    assert_merged(merged, reference([states[0], bf16], [0.5, 0.5]), dtype=torch.bfloat16)

    other = {**states[0], "3.weight": torch.zeros(2, 8)}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"tensor '3.weight' has shape \[2, 8\] in .*other.pt.* but \[3, 8\]"):
        emakit.merge([files[0], tmp_path / "other.pt"])
    fewer = {key: value for key, value in states[0].items() if key != "0.bias"}
    torch.save(fewer, tmp_path / "fewer.pt")
    with pytest.raises(ValueError, match=r"fewer.pt' has no tensor '0.bias'"):
        emakit.merge([files[0], tmp_path / "fewer.pt"])
    torch.save({"weights": states[0], "note": object.__new__(TensorDataset)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"holds objects other than tensors.*--trust-pickle"):
        emakit.merge([tmp_path / "pickled.pt"])
    result = subprocess.run(
        [sys.executable, "-m", "emakit.cli", "merge", str(files[0]), "--out", str(tmp_path / "folder")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "no config.json to make it a from_pretrained folder" in result.stderr
