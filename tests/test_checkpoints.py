"""Trainer checkpoints: hostile and broken files are refused naming the file and change nothing; writes are atomic;
retention; autoresume falls back past a corrupt newest checkpoint; checkpoints hold the training weights, never the
swapped-in EMA's; the EMA state in a checkpoint resumes exactly.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Callback, Classifier, Timestamp, Trainer
from emakit.cli import main as emakit_main
from emakit.trainer.checkpoint import FORMAT_VERSION, list_checkpoints, load_checkpoint

BATCHES_PER_EPOCH = 4  # 16 samples in batches of 4


# ----------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, hidden: int = 5, batchnorm: bool = True) -> Classifier:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, hidden)]
    layers += [nn.BatchNorm1d(hidden)] if batchnorm else [nn.Tanh()]
    layers.append(nn.Linear(hidden, 3))
    return Classifier(nn.Sequential(*layers))


def loader(shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    return DataLoader(data, batch_size=4, shuffle=shuffle)


def make_trainer(model: nn.Module, max_duration: str = "8ba", ema: EMA | None = None, **kwargs) -> Trainer:
    kwargs.setdefault("optimizers", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("seed", 0)
    algorithms = [ema if ema is not None else EMA(half_life="2ba")]
    return Trainer(model=model, train_dataloader=loader(), max_duration=max_duration, algorithms=algorithms, **kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def ema_state(ema: EMA) -> dict:
    state = ema.state_dict()
    state["weights"] = {name: t.detach().clone() for name, t in state["weights"].items()}
    return state


def assert_same_ema_state(expected: dict, actual: dict) -> None:
    assert {k: v for k, v in expected.items() if k != "weights"} == {k: v for k, v in actual.items() if k != "weights"}
    assert_same(expected["weights"], actual["weights"])


def real_checkpoint(folder: Path, batches: int = 4) -> Path:
    """The checkpoint after ``batches`` batches of a small run with an EMA."""
    make_trainer(make_model(), f"{batches}ba", save_folder=folder, save_interval=f"{batches}ba").fit()
    return list_checkpoints(folder)[-1]


class Trained:
    """A model and EMA trained for 4 batches, and everything that must not change when a checkpoint is refused."""

    def __init__(self) -> None:
        self.model = make_model(seed=3)
        self.ema = EMA(half_life="2ba")
        make_trainer(self.model, "4ba", self.ema).fit()
        assert self.ema.started
        self.weights = snapshot(self.model)
        self.ema_state = ema_state(self.ema)

    def trainer(self, **kwargs) -> Trainer:
        """A trainer continuing with this model and EMA."""
        trainer = make_trainer(self.model, "8ba", self.ema, **kwargs)
        self.optimizer_state = repr(trainer.state.optimizers[0].state_dict())
        return trainer

    def assert_unchanged(self, trainer: Trainer) -> None:
        assert_same(self.weights, snapshot(self.model))
        assert_same_ema_state(self.ema_state, ema_state(self.ema))
        assert trainer.state.timestamp == Timestamp()
        assert trainer.state.eval_history == []
        assert repr(trainer.state.optimizers[0].state_dict()) == self.optimizer_state


def named(path: Path) -> str:
    return re.escape(repr(str(path)))


# ------------------------------------------------------------------------ hostile checkpoints
class Payload:
    """Unpickling this runs ``function(*args)``: with ``weights_only=False``, torch.load would call it."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def hostile_checkpoint(tmp_path: Path, marker: Path, how: str, name: str = "hostile.pt") -> Path:
    """A valid checkpoint with one more entry, a pickled call that would create ``marker``."""
    checkpoint = load_checkpoint(real_checkpoint(tmp_path / "real"))
    payload = Payload(open, str(marker), "w") if how == "open" else Payload(os.system, f"touch '{marker}'")
    checkpoint["payload"] = payload
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("how", ["open", "os.system"])
def test_a_checkpoint_with_a_pickled_payload_is_refused_by_the_trainer_and_export_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path, marker, how)
    trained = Trained()
    trainer = trained.trainer(load_path=path)
    with pytest.raises(ValueError, match=named(path) + ".*refused"):
        trainer.fit()
    assert not marker.exists()
    trained.assert_unchanged(trainer)

    out = tmp_path / "ema.safetensors"
    with pytest.raises(ValueError, match=named(path) + ".*refused"):
        emakit_main(["export", str(path), str(out)])
    assert not marker.exists()
    assert not out.exists()

    # the file really is hostile: an unsafe load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_hostile_newest_checkpoint_is_skipped_by_autoresume_with_a_warning_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "run"
    good = real_checkpoint(folder, batches=4)
    hostile = hostile_checkpoint(tmp_path, marker, "open", name="x.pt").replace(folder / "ep1-ba8.pt")
    trainer = make_trainer(make_model(seed=5), "4ba", save_folder=folder, autoresume=True)
    with pytest.warns(UserWarning, match=named(hostile)):
        trainer.fit()
    assert not marker.exists()
    assert trainer.state.timestamp.batch == 4  # resumed from the good checkpoint, nothing left to train
    assert_same(load_checkpoint(good)["model"], snapshot(trainer.state.model))


# --------------------------------------------------------------------------- broken files
def _truncated(real: Path) -> bytes:
    data = real.read_bytes()
    return data[: len(data) // 2]


def _flipped_tensor_data(real: Path) -> bytes:
    """The file with the first 4 bytes of each tensor's data inverted (bit rot that the zip's CRC-32s record)."""
    data = bytearray(real.read_bytes())
    with zipfile.ZipFile(real) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size and info.compress_type == zipfile.ZIP_STORED:
                # a local file header is 30 bytes, then the name and the extra field, then the stored data
                header = info.header_offset
                name_length, extra_length = struct.unpack("<HH", data[header + 26 : header + 30])
                start = header + 30 + name_length + extra_length
                data[start : start + 4] = bytes(255 - b for b in data[start : start + 4])
    return bytes(data)


BROKEN = {
    "truncated-half": _truncated,
    "truncated-to-one-byte": lambda real: real.read_bytes()[:1],
    "empty": lambda real: b"",
    "random-bytes-0": lambda real: random.Random(0).randbytes(4096),
    "random-bytes-1": lambda real: random.Random(1).randbytes(4096),
    "random-bytes-2": lambda real: random.Random(2).randbytes(4096),
    "text": lambda real: b"hello world\n",
    "flipped-bytes-in-tensor-data": _flipped_tensor_data,
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_checkpoint_file_raises_value_error_naming_it_and_changes_nothing(tmp_path, kind):
    path = tmp_path / "broken.pt"
    path.write_bytes(BROKEN[kind](real_checkpoint(tmp_path / "real")))
    trained = Trained()
    trainer = trained.trainer(load_path=path)
    with pytest.raises(ValueError, match=named(path)):
        trainer.fit()
    trained.assert_unchanged(trainer)


@pytest.mark.parametrize("kind", ["truncated-half", "random-bytes-2", "text"])
def test_export_of_a_broken_checkpoint_raises_value_error_naming_it(tmp_path, kind):
    path = tmp_path / "broken.pt"
    path.write_bytes(BROKEN[kind](real_checkpoint(tmp_path / "real")))
    out = tmp_path / "ema.safetensors"
    with pytest.raises(ValueError, match=named(path)):
        emakit_main(["export", str(path), str(out)])
    assert not out.exists()


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_a_checkpoint_of_an_unknown_format_version_raises_naming_file_and_version(tmp_path, version):
    checkpoint = load_checkpoint(real_checkpoint(tmp_path / "real"))
    if version is None:
        del checkpoint["format_version"]
    else:
        checkpoint["format_version"] = version
    path = tmp_path / "future.pt"
    torch.save(checkpoint, path)
    trained = Trained()
    trainer = trained.trainer(load_path=path)
    with pytest.raises(ValueError, match=named(path) + ".*format version " + re.escape(repr(version))):
        trainer.fit()
    trained.assert_unchanged(trainer)


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        # Linear, Tanh, Linear: the trainer's model has BatchNorm at index 1, the checkpoint nothing
        (lambda: make_model(batchnorm=False), "'module.1.weight'"),
        # 6 hidden units instead of 5: the first tensor already differs in shape
        (lambda: make_model(hidden=6), "'module.0.weight' has shape (6, 4)"),
    ],
    ids=["other-names", "other-shapes"],
)
def test_a_checkpoint_of_another_model_raises_naming_file_and_first_mismatching_tensor_and_changes_nothing(
    tmp_path, other, fragment
):
    folder = tmp_path / "other"
    make_trainer(other(), "2ba", save_folder=folder, save_interval="2ba").fit()
    (path,) = list_checkpoints(folder)
    trained = Trained()
    trainer = trained.trainer(load_path=path)
    with pytest.raises(ValueError, match=named(path) + ".*" + re.escape(fragment)):
        trainer.fit()
    trained.assert_unchanged(trainer)


def test_a_checkpoint_whose_optimizer_does_not_fit_raises_naming_the_file_and_changes_nothing(tmp_path):
    """Everything is checked before anything is loaded: the model is not left loaded when the optimizer fails."""
    folder = tmp_path / "two-groups"
    model = make_model(seed=1)
    first, *rest = model.parameters()
    two_groups = torch.optim.SGD([{"params": [first]}, {"params": rest}], lr=0.1, momentum=0.9)
    make_trainer(model, "2ba", optimizers=two_groups, save_folder=folder, save_interval="2ba").fit()
    (path,) = list_checkpoints(folder)
    trained = Trained()
    trainer = trained.trainer(load_path=path)
    with pytest.raises(ValueError, match=named(path)):
        trainer.fit()
    trained.assert_unchanged(trainer)


# ------------------------------------------------------------------------ atomic writes
def test_checkpoints_are_written_without_leaving_temporary_files(tmp_path):
    make_trainer(make_model(), "6ba", save_folder=tmp_path, save_interval="1ba").fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"ep{(b - 1) // BATCHES_PER_EPOCH}-ba{b}.pt" for b in range(1, 7))
    for path in tmp_path.iterdir():
        assert load_checkpoint(path)["format_version"] == FORMAT_VERSION


class Unpicklable(Callback):
    """A stateful callback whose state cannot be saved from batch ``after`` on."""

    def __init__(self, after: int) -> None:
        self.after, self.batch = after, 0

    def batch_end(self, state, logger) -> None:
        self.batch = state.timestamp.batch

    def state_dict(self) -> dict:
        return {"batch": self.batch, "bad": (lambda: 0) if self.batch >= self.after else None}


def test_a_save_that_fails_leaves_no_partial_file_and_keeps_the_earlier_checkpoints(tmp_path):
    trainer = make_trainer(make_model(), "8ba", save_folder=tmp_path, save_interval="2ba", callbacks=[Unpicklable(4)])
    with pytest.raises(Exception, match=r"(?i)pickle"):
        trainer.fit()
    assert [p.name for p in tmp_path.iterdir()] == ["ep0-ba2.pt"]
    assert load_checkpoint(tmp_path / "ep0-ba2.pt")["timestamp"]["batch"] == 2


# -------------------------------------------------------------------------------- retention
def test_save_num_checkpoints_to_keep_keeps_only_the_newest(tmp_path):
    make_trainer(make_model(), "7ba", save_folder=tmp_path, save_interval="1ba", save_num_checkpoints_to_keep=2).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep1-ba6.pt", "ep1-ba7.pt"]


@pytest.mark.parametrize("keep", [0, -2, "x", 1.5, True, None])
def test_save_num_checkpoints_to_keep_not_a_positive_int_or_minus_one_raises(tmp_path, keep):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"save_num_checkpoints_to_keep={keep!r}")):
        make_trainer(model, save_folder=tmp_path, save_num_checkpoints_to_keep=keep)
    assert_same(before, snapshot(model))
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- autoresume
def run_to_the_end(folder: Path, **kwargs) -> tuple[Trainer, EMA]:
    ema = EMA(half_life="2ba")
    model = make_model(seed=kwargs.pop("model_seed", 0))
    trainer = make_trainer(model, "8ba", ema, save_folder=folder, save_interval="2ba", **kwargs)
    trainer.fit()
    return trainer, ema


class Started(Callback):
    """Records the batch a fit started at: 0, or where it resumed."""

    def fit_start(self, state, logger) -> None:
        self.batch = state.timestamp.batch


@pytest.mark.parametrize("corrupt", ["truncated-half", "random-bytes-0", "empty"])
def test_autoresume_skips_a_corrupt_newest_checkpoint_with_a_warning_and_resumes_from_the_previous(tmp_path, corrupt):
    full, full_ema = run_to_the_end(tmp_path / "full", callbacks=[Started()])
    folder = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", folder)
    (folder / "ep1-ba8.pt").unlink()
    newest = folder / "ep1-ba6.pt"
    newest.write_bytes(BROKEN[corrupt](newest))
    started = Started()
    with pytest.warns(UserWarning, match=named(newest)):
        resumed, resumed_ema = run_to_the_end(folder, autoresume=True, model_seed=9, callbacks=[started])
    assert started.batch == 4
    assert_same(snapshot(full.state.model), snapshot(resumed.state.model))
    assert_same_ema_state(ema_state(full_ema), ema_state(resumed_ema))
    assert load_checkpoint(newest)["timestamp"]["batch"] == 6  # written again, complete


# ---------------------------------------------------------- training weights, never the EMA's
class Record(Callback):
    """At each BATCH_CHECKPOINT (after the batch's eval, before its checkpoint): training and EMA weights."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.training: dict[int, dict[str, torch.Tensor]] = {}
        self.ema_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.ema_states: dict[int, dict] = {}

    def batch_checkpoint(self, state, logger) -> None:
        batch = state.timestamp.batch
        self.training[batch] = snapshot(state.model)
        self.ema_states[batch] = ema_state(self.ema)
        if self.ema.started:
            self.ema_weights[batch] = snapshot(self.ema.ema_model)


def test_a_checkpoint_taken_right_after_an_eval_holds_the_training_weights_not_the_emas(tmp_path):
    ema = EMA(half_life="1ba")
    record = Record(ema)
    model = make_model()
    trainer = make_trainer(
        model,
        "6ba",
        ema,
        eval_dataloader=loader(),
        eval_interval="2ba",
        save_folder=tmp_path,
        save_interval="2ba",
        callbacks=[record],
    )
    trainer.fit()
    assert [entry["batch"] for entry in trainer.state.eval_history] == [2, 4, 6]
    for path in list_checkpoints(tmp_path):
        checkpoint = load_checkpoint(path)
        batch = checkpoint["timestamp"]["batch"]
        assert_same(record.training[batch], checkpoint["model"])
        differs = [k for k, v in record.ema_weights[batch].items() if not torch.equal(v, checkpoint["model"][k])]
        assert differs, f"batch {batch}: the EMA weights equal the training weights, the test proves nothing"
        assert_same(record.ema_states[batch]["weights"], checkpoint["algorithms"][0]["weights"])


def test_a_checkpoint_saved_while_the_ema_weights_are_swapped_in_holds_the_training_weights(tmp_path):
    """Trainer.state_dict promises "training weights, never swapped-in EMA weights", also inside ema_weights()."""
    ema = EMA(half_life="1ba")
    model = make_model()
    trainer = make_trainer(model, "4ba", ema, save_folder=tmp_path, save_interval="100ba")
    trainer.fit()
    training, average = snapshot(model), snapshot(ema.ema_model)
    with ema.ema_weights(model):
        path = trainer.save_checkpoint()
    checkpoint = load_checkpoint(path)
    assert_same(training, checkpoint["model"])
    assert_same(average, checkpoint["algorithms"][0]["weights"])


# ------------------------------------------------------------------------- exact EMA resume
class Counter(Callback):
    """A stateful callback: counts batches; its count must come back on resume."""

    def __init__(self) -> None:
        self.batches = 0

    def batch_end(self, state, logger) -> None:
        self.batches += 1

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


def test_the_ema_state_in_a_checkpoint_resumes_exactly(tmp_path):
    ema = EMA(half_life="3ba", update_interval="2ba")
    record = Record(ema)
    callbacks = [record, Counter()]
    trainer = make_trainer(make_model(), "8ba", ema, save_folder=tmp_path, save_interval="6ba", callbacks=callbacks)
    trainer.fit()
    path = tmp_path / "ep1-ba6.pt"
    checkpoint = load_checkpoint(path)
    assert {"python", "torch", "numpy"} <= checkpoint["rng"].keys()
    assert checkpoint["callbacks"][1] == {"batches": 6}

    fresh_ema, counter = EMA(half_life="3ba", update_interval="2ba"), Counter()
    fresh = make_model(seed=8)
    make_trainer(fresh, "6ba", fresh_ema, load_path=path, callbacks=[Record(fresh_ema), counter]).fit()
    assert fresh_ema.started and fresh_ema.num_updates == 3
    assert_same_ema_state(record.ema_states[6], ema_state(fresh_ema))
    assert_same(record.ema_weights[6], snapshot(fresh_ema.ema_model))
    assert_same(record.training[6], snapshot(fresh))
    assert counter.batches == 6
