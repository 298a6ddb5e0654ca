"""EMA inside ``emakit.Trainer(..., algorithms=[ema])``, and the Trainer's own contract.

Closed-form checks record the training weights in a callback at BATCH_END (or EPOCH_END):
callbacks run after algorithms, so they see the weights the EMA just averaged.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from closed_form import ClosedForm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Algorithm, Callback, Classifier, Event, Trainer
from emakit.algorithms import EMAAlgorithm

ATOL, RTOL = 1e-6, 1e-5
BATCHES_PER_EPOCH = 6  # 48 training samples in batches of 8


# ----------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, dropout: float = 0.0) -> Classifier:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return Classifier(nn.Sequential(*layers))


def dataset(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def train_loader(n: int = 48, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(n, seed=1), batch_size=batch_size, shuffle=shuffle)


def eval_loader(n: int = 32) -> DataLoader:
    return DataLoader(dataset(n, seed=2), batch_size=16)


def make_trainer(model: nn.Module, max_duration="2ep", **kwargs) -> Trainer:
    kwargs.setdefault("train_dataloader", train_loader())
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("seed", 0)
    return Trainer(model=model, max_duration=max_duration, **kwargs)


def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: v.detach().to(torch.float64).clone() for k, v in state.items() if v.is_floating_point()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ema_snapshot(ema: EMA) -> dict[str, torch.Tensor] | None:
    """The EMA weights now, or None while the EMA has not started."""
    try:
        return snapshot(ema.ema_model)
    except RuntimeError:
        return None


def assert_close_to(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert expected, "nothing to compare"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].to(torch.float64), value, atol=ATOL, rtol=RTOL, msg=name)


def assert_equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


class Recorder(Callback):
    """Records, at each batch and epoch end, the training weights and the EMA weights."""

    def __init__(self, ema: EMA | None = None) -> None:
        self.ema = ema
        self.batch_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batch_ema: dict[int, dict[str, torch.Tensor] | None] = {}
        self.epoch_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.epoch_ema: dict[int, dict[str, torch.Tensor] | None] = {}
        self.last_training: dict[str, torch.Tensor] | None = None
        self.last_by_batch: dict[int, dict[str, torch.Tensor]] = {}

    def batch_end(self, state, logger) -> None:
        batch = state.timestamp.batch
        self.batch_weights[batch] = weights64(state.model)
        self.last_training = self.last_by_batch[batch] = snapshot(state.model)
        if self.ema is not None:
            self.batch_ema[batch] = ema_snapshot(self.ema)

    def epoch_end(self, state, logger) -> None:
        epoch = state.timestamp.epoch
        self.epoch_weights[epoch] = weights64(state.model)
        self.last_training = snapshot(state.model)
        if self.ema is not None:
            self.epoch_ema[epoch] = ema_snapshot(self.ema)


@torch.no_grad()
def manual_eval(model: Classifier, loader: DataLoader) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        outputs = model((x, y))
        loss += float(model.loss(outputs, (x, y))) * len(y)
        correct += int((outputs.argmax(-1) == y).sum())
        count += len(y)
    model.train(was_training)
    return {"loss": loss / count, "accuracy": correct / count}


# ------------------------------------------------------------ closed form, batches
@pytest.mark.parametrize(
    ("ema_start", "interval", "max_duration", "first"),
    [
        ("0.0dur", "1ba", "2ep", 1),
        ("0.0dur", "3ba", "2ep", 3),
        ("5ba", "1ba", "2ep", 5),
        ("5ba", "3ba", "2ep", 6),
        ("0.5dur", "1ba", "4ep", 12),  # 24 batches: half-way after batch 12
        ("0.5dur", "5ba", "4ep", 15),
    ],
)
def test_ema_follows_the_closed_form_at_batch_ends(ema_start, interval, max_duration, first):
    model = make_model()
    ema = EMA(half_life="10ba", ema_start=ema_start, update_interval=interval)
    every = int(interval[:-2])
    recorder = Recorder(ema)
    trainer = make_trainer(model, max_duration, eval_dataloader=eval_loader(), algorithms=[ema], callbacks=[recorder])
    trainer.fit()
    total = int(max_duration[:-2]) * BATCHES_PER_EPOCH
    assert sorted(recorder.batch_weights) == list(range(1, total + 1))
    reference = ClosedForm(2 ** (-every / 10))
    for batch in range(1, total + 1):
        if batch >= first and batch % every == 0:
            reference.update(recorder.batch_weights[batch])
        if reference.ema is None:
            assert recorder.batch_ema[batch] is None, f"EMA started before batch {first}, at {batch}"
        else:
            assert recorder.batch_ema[batch] is not None, f"EMA not started at batch {batch}"
            assert_close_to(recorder.batch_ema[batch], reference.ema)
    assert_close_to(snapshot(ema.ema_model), reference.ema)
    # the evaluations in between (every epoch, and at the end) gave the training weights back
    assert_equal_state(snapshot(model), recorder.last_training)


@pytest.mark.parametrize(
    ("ema_start", "max_duration", "first"), [("0.0dur", "3ep", 1), ("2ep", "3ep", 2), ("0.5dur", "4ep", 2)]
)
def test_ema_in_epochs_updates_at_epoch_ends(ema_start, max_duration, first):
    model = make_model()
    ema = EMA(half_life="2ep", ema_start=ema_start)
    assert ema.smoothing == pytest.approx(2**-0.5)
    recorder = Recorder(ema)
    make_trainer(model, max_duration, algorithms=[ema], callbacks=[recorder]).fit()
    epochs = int(max_duration[:-2])
    reference = ClosedForm(2**-0.5)
    for epoch in range(1, epochs + 1):
        if epoch >= first:
            reference.update(recorder.epoch_weights[epoch])
            assert_close_to(recorder.epoch_ema[epoch], reference.ema)
        else:
            assert recorder.epoch_ema[epoch] is None
    # no update at batch ends: inside epoch e the EMA is the one of the end of epoch e - 1
    for batch, average in recorder.batch_ema.items():
        previous_epoch = (batch - 1) // BATCHES_PER_EPOCH
        if previous_epoch < first:
            assert average is None, batch
        else:
            assert_equal_state(average, recorder.epoch_ema[previous_epoch])


class RecordBeforeEMA(Algorithm):
    """Runs before the EMA at BATCH_END (listed after it: closing events run in reverse): sees the step's weights."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def match(self, event, state) -> bool:
        return event == Event.BATCH_END

    def apply(self, event, state, logger) -> None:
        self.weights[state.timestamp.batch] = weights64(state.model)


def test_train_with_ema_weights_trains_from_the_average():
    model = make_model()
    ema = EMA(half_life="4ba", update_interval="2ba", train_with_ema_weights=True)
    before = RecordBeforeEMA()
    recorder = Recorder(ema)
    # BATCH_END closes a batch: algorithms run in reverse there, so `before` (listed last) records first
    make_trainer(model, "1ep", algorithms=[ema, before], callbacks=[recorder]).fit()
    reference = ClosedForm(2 ** (-2 / 4))
    for batch in range(1, BATCHES_PER_EPOCH + 1):
        if batch % 2 == 0:
            reference.update(before.weights[batch])
            assert_close_to(recorder.batch_weights[batch], reference.ema)
            assert_equal_state(recorder.last_by_batch[batch], recorder.batch_ema[batch])
        else:
            assert_equal_state(recorder.batch_weights[batch], before.weights[batch])


# -------------------------------------------------------------------- evaluation
def test_eval_metrics_come_from_the_ema_weights():
    model = make_model()
    ema = EMA(half_life="3ba")
    loader = eval_loader()
    trainer = make_trainer(
        model,
        "3ep",
        eval_dataloader=loader,
        algorithms=[ema],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
    )
    trainer.fit()
    training = snapshot(model)
    metrics = trainer.eval()
    assert_equal_state(snapshot(model), training)
    assert set(metrics) >= {"loss", "accuracy"}
    with ema.ema_weights(model):
        expected = manual_eval(model, loader)
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["loss"] != pytest.approx(manual_eval(model, loader)["loss"], rel=1e-3)
    assert trainer.state.eval_history[-1]["loss"] == metrics["loss"]


def test_evaluations_during_fit_use_training_weights_before_the_ema_starts_and_the_ema_after():
    loader = eval_loader()
    ema = EMA(half_life="3ba", ema_start="0.5dur")  # of 4 epochs: starts at the end of epoch 2
    expected: list[dict[str, float]] = []

    class ManualEval(Callback):
        def epoch_end(self, state, logger) -> None:  # runs before the trainer's evaluation of this epoch
            if state.timestamp.epoch < 2:
                expected.append(manual_eval(state.model, loader))
            else:
                with ema.ema_weights(state.model):
                    expected.append(manual_eval(state.model, loader))

    trainer = make_trainer(make_model(), "4ep", eval_dataloader=loader, algorithms=[ema], callbacks=[ManualEval()])
    trainer.fit()
    history = trainer.state.eval_history
    assert len(history) == len(expected) == 4
    for entry, manual in zip(history, expected, strict=True):
        assert entry["loss"] == pytest.approx(manual["loss"], rel=1e-5)
        assert entry["accuracy"] == pytest.approx(manual["accuracy"])


def test_training_weights_are_restored_bit_for_bit_after_an_eval_that_raises():
    class FailingEval(Callback):
        armed = False

        def eval_batch_end(self, state, logger) -> None:
            if self.armed:
                raise RuntimeError("eval failed")

    model = make_model()
    ema = EMA(half_life="3ba")
    failing = FailingEval()
    trainer = make_trainer(model, "1ep", eval_dataloader=eval_loader(), algorithms=[ema], callbacks=[failing])
    trainer.fit()
    metrics = trainer.eval()
    training = snapshot(model)
    failing.armed = True
    with pytest.raises(RuntimeError, match="eval failed"):
        trainer.eval()
    assert_equal_state(snapshot(model), training)
    assert model.training
    failing.armed = False
    assert trainer.eval() == metrics  # the EMA is swapped out again and intact
    assert_equal_state(snapshot(model), training)


def test_eval_history_has_one_entry_per_epoch():
    trainer = make_trainer(
        make_model(),
        "3ep",
        eval_dataloader=eval_loader(),
        eval_interval="1ep",
        algorithms=[EMA(half_life="3ba")],
    )
    trainer.fit()
    history = trainer.state.eval_history
    assert [(h["batch"], h["epoch"]) for h in history] == [(6, 1), (12, 2), (18, 3)]
    assert all(0.0 <= h["accuracy"] <= 1.0 and math.isfinite(h["loss"]) for h in history)


@pytest.mark.parametrize(("interval", "batches"), [("4ba", [4, 8, 12]), ("5ba", [5, 10, 12])])
def test_eval_history_has_one_entry_per_n_batches_and_one_at_the_end(interval, batches):
    trainer = make_trainer(make_model(), "2ep", eval_dataloader=eval_loader(), eval_interval=interval)
    trainer.fit()
    assert [h["batch"] for h in trainer.state.eval_history] == batches


# ------------------------------------------------------------------------ events
class LogAlgorithm(Algorithm):
    def __init__(self, log: list) -> None:
        self.log = log

    def match(self, event, state) -> bool:
        return True

    def apply(self, event, state, logger) -> None:
        self.log.append(("algorithm", event))


class LogCallback(Callback):
    def __init__(self, log: list) -> None:
        self.log = log


def _logging_method(event: Event):
    def method(self, state, logger) -> None:
        self.log.append(("callback", event))

    return method


for _event in Event:
    setattr(LogCallback, _event.value, _logging_method(_event))


def test_events_fire_in_the_documented_order_algorithms_before_callbacks():
    log: list = []
    trainer = make_trainer(
        make_model(),
        "2ep",
        train_dataloader=train_loader(n=16),
        eval_dataloader=eval_loader(n=16),
        algorithms=[LogAlgorithm(log)],
        callbacks=[LogCallback(log)],
    )
    trainer.fit()
    batch = [
        Event.BATCH_START,
        Event.AFTER_FORWARD,
        Event.AFTER_LOSS,
        Event.AFTER_BACKWARD,
        Event.BATCH_END,
        Event.BATCH_CHECKPOINT,
    ]
    evaluation = [Event.EVAL_START, Event.EVAL_BATCH_END, Event.EVAL_END]
    epoch = [Event.EPOCH_START, *batch, *batch, Event.EPOCH_END, *evaluation, Event.EPOCH_CHECKPOINT]
    expected = [Event.INIT, Event.BEFORE_LOAD, Event.FIT_START, *epoch, *epoch, Event.FIT_END]
    # evaluating once more at the very end, at the same clock, would be redundant but not wrong
    with_final_eval = [*expected[:-1], *evaluation, Event.FIT_END]
    events = [event for who, event in log if who == "algorithm"]
    assert events in (expected, with_final_eval)
    assert log == [(who, event) for event in events for who in ("algorithm", "callback")]


def test_ema_swaps_its_weights_in_for_the_eval_events_only():
    seen: list[tuple[Event, str]] = []
    ema = EMA(half_life="3ba")

    class WhichWeights(Recorder):
        def _which(self, event, state) -> None:
            now = snapshot(state.model)
            average = self.batch_ema[state.timestamp.batch]
            if all(torch.equal(t, self.last_training[k]) for k, t in now.items()):
                seen.append((event, "training"))
            elif average is not None and all(torch.equal(t, average[k]) for k, t in now.items()):
                seen.append((event, "ema"))
            else:
                seen.append((event, "neither"))

        def eval_start(self, state, logger) -> None:
            self._which(Event.EVAL_START, state)

        def eval_batch_end(self, state, logger) -> None:
            self._which(Event.EVAL_BATCH_END, state)

        def eval_end(self, state, logger) -> None:
            self._which(Event.EVAL_END, state)

        def batch_checkpoint(self, state, logger) -> None:
            self._which(Event.BATCH_CHECKPOINT, state)

    make_trainer(
        make_model(),
        "1ep",
        eval_dataloader=eval_loader(),
        eval_interval="3ba",
        algorithms=[ema],
        callbacks=[WhichWeights(ema)],
    ).fit()
    assert seen == [
        *[(Event.BATCH_CHECKPOINT, "training")] * 2,
        (Event.EVAL_START, "ema"),
        *[(Event.EVAL_BATCH_END, "ema")] * 2,
        (Event.EVAL_END, "training"),
        *[(Event.BATCH_CHECKPOINT, "training")] * 3,
        (Event.EVAL_START, "ema"),
        *[(Event.EVAL_BATCH_END, "ema")] * 2,
        (Event.EVAL_END, "training"),
        (Event.BATCH_CHECKPOINT, "training"),
    ]


# ------------------------------------------------------- the EMA's trainer adapter
def test_an_ema_runs_in_a_trainer_through_its_one_adapter_and_checkpoints_hold_its_own_state():
    ema, again = EMA(half_life="3ba"), EMA(half_life="3ba")
    assert not isinstance(ema, Algorithm)  # the average by hand knows nothing of the trainer
    adapter = ema.as_algorithm()
    assert isinstance(adapter, EMAAlgorithm) and adapter.ema is ema and ema.as_algorithm() is adapter
    model, model_again = make_model(), make_model()
    trainer = make_trainer(model, "1ep", eval_dataloader=eval_loader(), algorithms=[ema])
    assert trainer.engine.algorithms == [adapter]
    trainer.fit()
    make_trainer(model_again, "1ep", eval_dataloader=eval_loader(), algorithms=[again.as_algorithm()]).fit()
    assert ema.num_updates == again.num_updates == BATCHES_PER_EPOCH  # the EMA or its adapter: one run
    assert_equal_state(snapshot(ema.ema_model), snapshot(again.ema_model))
    assert_equal_state(snapshot(model), snapshot(model_again))
    saved = trainer.state_dict()["algorithms"]
    assert len(saved) == 1 and saved[0].keys() == ema.state_dict().keys()
    assert_equal_state(saved[0]["weights"], ema.state_dict()["weights"])


def test_the_same_ema_listed_twice_is_one_adapter():
    ema = EMA(half_life="3ba")
    trainer = make_trainer(make_model(), "2ba", algorithms=[ema, ema])
    assert trainer.engine.algorithms[0] is trainer.engine.algorithms[1] is ema.as_algorithm()


def test_the_emas_old_algorithm_methods_forward_to_the_adapter_with_a_deprecation_warning():
    model = make_model()
    ema = EMA(half_life="3ba")
    trainer = make_trainer(model, "2ba", algorithms=[ema])
    trainer.fit()
    state, adapter = trainer.state, ema.as_algorithm()
    for event in (Event.BATCH_END, Event.EVAL_START, Event.EPOCH_END):
        with pytest.warns(DeprecationWarning, match=r"EMA.match\(...\) is deprecated.*as_algorithm\(\).match"):
            assert ema.match(event, state) == adapter.match(event, state)
    with pytest.warns(DeprecationWarning, match="EMA.apply"):
        ema.apply(Event.EVAL_START, state, trainer.logger)  # swaps the average in, as the adapter does
    assert ema.swapped
    deprecated = pytest.warns(DeprecationWarning, match=r"training_weights\(state\) is deprecated")
    with deprecated, ema.training_weights(state) as inside:
        assert inside is model and not ema.swapped
    assert ema.swapped
    with pytest.warns(DeprecationWarning, match="EMA.evaluation_weights"):
        assert list(ema.evaluation_weights(state)) == ["ema@3ba"]
    with pytest.warns(DeprecationWarning, match="EMA.apply"):
        ema.apply(Event.EVAL_END, state, trainer.logger)
    assert not ema.swapped


# -------------------------------------------------------------- trainer basics
def test_default_optimizer_is_sgd_with_lr_0_1():
    model = make_model()
    twin = make_model()
    trainer = make_trainer(model, "1ba")
    (optimizer,) = trainer.state.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())
    trainer.fit()
    manual = torch.optim.SGD(twin.parameters(), lr=0.1)
    x, y = next(iter(train_loader()))
    twin.loss(twin((x, y)), (x, y)).backward()
    manual.step()
    assert_equal_state(snapshot(model), snapshot(twin))


def test_amp_bf16_trains_and_evaluates_under_autocast():
    dtypes: dict[str, set] = {"train": set(), "eval": set()}

    class OutputDtypes(Callback):
        def after_forward(self, state, logger) -> None:
            dtypes["train"].add(state.outputs.dtype)

        def eval_batch_end(self, state, logger) -> None:
            dtypes["eval"].add(state.outputs.dtype)

    model = make_model()
    start = snapshot(model)
    ema = EMA(half_life="3ba")
    trainer = make_trainer(
        model,
        "1ep",
        eval_dataloader=eval_loader(),
        precision="amp_bf16",
        algorithms=[ema],
        callbacks=[OutputDtypes()],
    )
    trainer.fit()
    metrics = trainer.eval()
    assert dtypes == {"train": {torch.bfloat16}, "eval": {torch.bfloat16}}
    assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["accuracy"] <= 1.0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for t in ema.ema_model.state_dict().values())
    assert not torch.equal(model.module[0].weight, start["module.0.weight"])


@pytest.mark.parametrize(
    ("max_duration", "batch", "epoch", "in_epoch", "epoch_ends"), [("5ba", 5, 0, 5, 0), ("8ba", 8, 1, 2, 1)]
)
def test_max_duration_in_batches_stops_mid_epoch(max_duration, batch, epoch, in_epoch, epoch_ends):
    recorder = Recorder()
    trainer = make_trainer(make_model(), max_duration, callbacks=[recorder])
    trainer.fit()
    timestamp = trainer.state.timestamp
    assert (timestamp.batch, timestamp.epoch, timestamp.batch_in_epoch) == (batch, epoch, in_epoch)
    assert timestamp.sample == 8 * batch
    assert sorted(recorder.batch_weights) == list(range(1, batch + 1))
    assert len(recorder.epoch_weights) == epoch_ends


def test_timestamp_counts_batches_epochs_samples_and_tokens():
    trainer = make_trainer(make_model(), "2ep", train_dataloader=train_loader(n=44))  # last batch: 4
    trainer.fit()
    timestamp = trainer.state.timestamp
    names = ("batch", "epoch", "sample", "token", "batch_in_epoch")
    fields = {name: getattr(timestamp, name) for name in names}
    assert fields == {"batch": 12, "epoch": 2, "sample": 88, "token": 0, "batch_in_epoch": 0}
    assert all(type(value) is int for value in fields.values())


# ------------------------------------------------------------------- checkpoints
def test_save_interval_in_batches_writes_a_checkpoint_every_n_batches(tmp_path):
    trainer = make_trainer(make_model(), "2ep", save_folder=tmp_path, save_interval="2ba")
    trainer.fit()
    written = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(written) == 2 * BATCHES_PER_EPOCH // 2
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)


class CrashAt(Callback):
    def __init__(self, batch: int | None) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            raise KeyboardInterrupt  # the run dies after this batch, before its checkpoint


def resumable_run(
    folder, save_interval: str, ema_start: str, crash_at: int | None = None, model_seed: int = 0, **kwargs
):
    model = make_model(seed=model_seed, dropout=0.3)
    ema = EMA(half_life="4ba", ema_start=ema_start)
    trainer = make_trainer(
        model,
        "3ep",
        train_dataloader=train_loader(shuffle=True),
        eval_dataloader=eval_loader(),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        algorithms=[ema],
        callbacks=[CrashAt(crash_at)],
        save_folder=folder,
        save_interval=save_interval,
        seed=0,
        **kwargs,
    )
    return trainer, model, ema


@pytest.mark.parametrize(
    ("how", "save_interval", "crash_at", "ema_start"),
    [
        ("load_path", "4ba", 7, "0.0dur"),  # the only checkpoint: after batch 4, mid-epoch
        ("load_path", "6ba", 7, "0.0dur"),  # the only checkpoint: after batch 6, the last of epoch 1
        ("autoresume", "2ba", 9, "0.0dur"),  # the newest of the checkpoints after batches 2, 4, 6 and 8
        ("load_path", "4ba", 7, "0.5dur"),  # the checkpoint (batch 4) is from before the EMA starts (batch 9)
    ],
)
def test_resuming_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, how, save_interval, crash_at, ema_start):
    full, full_model, full_ema = resumable_run(tmp_path / "full", save_interval, ema_start)
    full.fit()

    crashed, _, _ = resumable_run(tmp_path / "crashed", save_interval, ema_start, crash_at=crash_at)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    if how == "load_path":
        (checkpoint,) = [p for p in (tmp_path / "crashed").iterdir() if not p.name.startswith(".")]
        options = {"folder": tmp_path / "resumed", "load_path": checkpoint}
    else:
        options = {"folder": tmp_path / "crashed", "autoresume": True}
    resumed, model, ema = resumable_run(save_interval=save_interval, ema_start=ema_start, model_seed=7, **options)
    resumed.fit()

    assert resumed.state.timestamp == full.state.timestamp
    assert_equal_state(snapshot(model), snapshot(full_model))
    assert_equal_state(snapshot(ema.ema_model), snapshot(full_ema.ema_model))
    assert resumed.state.eval_history == full.state.eval_history
    assert len(full.state.eval_history) == 3
    assert resumed.eval() == full.eval()


# --------------------------------------------------------------------------- several EMAs
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("first_flattened", [False, True], ids=["all-default", "first-flatten_model"])
def test_several_emas_follow_their_closed_forms_and_leave_training_unchanged(count, first_flattened):
    half_lives = [3, 5, 9][:count]
    emas = [EMA(half_life=f"{h}ba", flatten_model=first_flattened and i == 0) for i, h in enumerate(half_lives)]
    recorder = Recorder()
    model, plain = make_model(), make_model()
    trainer = make_trainer(model, "2ep", eval_dataloader=eval_loader(), algorithms=emas, callbacks=[recorder])
    trainer.fit()
    make_trainer(plain, "2ep", eval_dataloader=eval_loader()).fit()
    assert_equal_state(snapshot(model), snapshot(plain))  # the EMAs and their evaluation swaps changed nothing
    for ema, half_life in zip(emas, half_lives):
        reference = ClosedForm(2 ** (-1 / half_life))
        for batch in sorted(recorder.batch_weights):
            reference.update(recorder.batch_weights[batch])
        assert_close_to(snapshot(ema.ema_model), reference.ema)
    # swaps nest (closing events run algorithms in reverse): evaluation saw the last EMA's average
    with emas[-1].ema_weights(model):
        expected = manual_eval(model, eval_loader())
    assert trainer.state.eval_history[-1]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert not any(ema.shadow.swapped for ema in emas)


def test_a_checkpoint_written_during_an_evaluation_with_several_emas_holds_the_training_weights(tmp_path):
    emas = [EMA(half_life="3ba"), EMA(half_life="5ba", flatten_model=True)]
    model = make_model()
    trainer = make_trainer(model, "1ep", eval_dataloader=eval_loader(), algorithms=emas)
    trainer.fit()
    training = snapshot(model)
    for ema in emas:
        ema.get_ema_model(model)  # both swapped in, as during an evaluation
    checkpoint = trainer.state_dict()
    assert_equal_state({k: v for k, v in checkpoint["model"].items()}, training)
    for ema in reversed(emas):
        ema.get_training_model(model)
    assert_equal_state(snapshot(model), training)


def test_eval_weights_both_measures_the_training_weights_and_every_average_in_one_run():
    emas = [EMA(half_life="3ba"), EMA(half_life="9ba")]
    model, plain = make_model(), make_model()
    trainer = make_trainer(model, "2ep", eval_dataloader=eval_loader(), algorithms=emas, eval_weights="both")
    trainer.fit()
    make_trainer(plain, "2ep", eval_dataloader=eval_loader(), algorithms=[EMA(half_life="9ba")]).fit()
    assert_equal_state(snapshot(model), snapshot(plain))  # measuring more weights changes nothing in training
    last = trainer.state.eval_history[-1]
    expected = {"training": manual_eval(model, eval_loader())}
    for ema in emas:
        with ema.ema_weights(model):
            expected[ema.label] = manual_eval(model, eval_loader())
    assert set(expected) == {"training", "ema@3ba", "ema@9ba"}
    for label, metrics in expected.items():
        for name, value in metrics.items():
            assert last[f"{name}/{label}"] == pytest.approx(value, rel=1e-5), f"{name}/{label}"
    assert last["loss"] == pytest.approx(expected["ema@9ba"]["loss"], rel=1e-5)  # the plain names: the default
    assert not any(ema.shadow.swapped for ema in emas)


def test_eval_weights_training_measures_the_training_weights_under_the_usual_names():
    ema, model, plain = EMA(half_life="3ba"), make_model(), make_model()
    trainer = make_trainer(model, "2ep", eval_dataloader=eval_loader(), algorithms=[ema], eval_weights="training")
    trainer.fit()
    make_trainer(plain, "2ep", eval_dataloader=eval_loader()).fit()
    assert_equal_state(snapshot(model), snapshot(plain))  # what is measured changes nothing in training
    last = trainer.state.eval_history[-1]
    expected = manual_eval(model, eval_loader())
    assert set(last) == {"batch", "epoch", *expected}  # the usual names, nothing marked
    for name, value in expected.items():
        assert last[name] == pytest.approx(value, rel=1e-5), name
    with ema.ema_weights(model):
        assert manual_eval(model, eval_loader())["loss"] != pytest.approx(last["loss"], rel=1e-3)  # not the average
    assert trainer.eval() == {name: last[name] for name in expected}
    assert not ema.shadow.swapped


def test_eval_weights_ema_is_the_default_and_measures_the_average():
    ema, model = EMA(half_life="3ba"), make_model()
    trainer = make_trainer(model, "1ep", eval_dataloader=eval_loader(), algorithms=[ema])
    assert trainer.eval_weights == "ema"
    trainer.fit()
    with ema.ema_weights(model):
        expected = manual_eval(model, eval_loader())
    assert trainer.state.eval_history[-1] == pytest.approx({"batch": 6, "epoch": 1, **expected}, rel=1e-5)


@pytest.mark.parametrize("value", ["average", "all", True, None])
def test_eval_weights_must_be_one_of_ema_training_both(value):
    with pytest.raises(ValueError, match=f"eval_weights={value!r} must be one of 'ema', 'training', 'both'"):
        make_trainer(make_model(), eval_weights=value)


@pytest.mark.parametrize(("old", "new"), [(True, "both"), (False, "ema")])
def test_evaluate_all_weights_is_deprecated_and_means_eval_weights(old, new):
    emas, new_emas = [EMA(half_life="3ba")], [EMA(half_life="3ba")]
    message = rf"Trainer\(evaluate_all_weights={old}\) is deprecated.*use Trainer\(eval_weights='{new}'\)"
    with pytest.warns(DeprecationWarning, match=message) as warned:
        trainer = make_trainer(
            make_model(), "1ep", eval_dataloader=eval_loader(), algorithms=emas, evaluate_all_weights=old
        )
    assert warned[0].filename == __file__  # the warning points at the caller's line
    assert trainer.eval_weights == new
    trainer.fit()
    renamed = make_trainer(make_model(), "1ep", eval_dataloader=eval_loader(), algorithms=new_emas, eval_weights=new)
    renamed.fit()
    assert trainer.state.eval_history == renamed.state.eval_history  # the same names, the same numbers
    with pytest.warns(DeprecationWarning, match=r"Trainer.evaluate_all_weights is deprecated.*Trainer.eval_weights"):
        assert trainer.evaluate_all_weights is old
    with pytest.warns(DeprecationWarning, match="evaluate_all_weights"):
        trainer.evaluate_all_weights = not old
    assert trainer.eval_weights == ("both" if not old else "ema")


def test_evaluate_all_weights_must_be_a_bool_and_agree_with_eval_weights():
    with pytest.raises(ValueError, match="evaluate_all_weights='yes' must be one of True, False"):
        make_trainer(make_model(), evaluate_all_weights="yes")
    with pytest.raises(ValueError, match=r"evaluate_all_weights=True .* and eval_weights='training' disagree"):
        make_trainer(make_model(), evaluate_all_weights=True, eval_weights="training")
    trainer = make_trainer(make_model(), eval_weights="training")
    with pytest.warns(DeprecationWarning):
        assert trainer.evaluate_all_weights is False  # "training" measures no more than one set of weights


def test_amp_fp16_trains_like_autocast_with_a_grad_scaler_by_hand(tmp_path):
    model, by_hand = make_model(), make_model()
    trainer = make_trainer(
        model,
        "2ep",
        precision="amp_fp16",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
        save_folder=tmp_path,
        save_interval="1ep",
    )
    trainer.fit()
    optimizer, scaler = torch.optim.SGD(by_hand.parameters(), lr=0.5), torch.amp.GradScaler("cpu")
    scaler_states = []
    for _ in range(2):
        for batch in train_loader():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = by_hand.loss(by_hand(batch), batch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
        scaler_states.append(dict(scaler.state_dict()))
    assert_equal_state(snapshot(model), snapshot(by_hand))
    for epoch, expected in enumerate(scaler_states, start=1):
        checkpoint = torch.load(tmp_path / f"ep{epoch}-ba{6 * epoch}.pt", weights_only=True)
        assert checkpoint["grad_scaler"] == expected


def test_amp_fp16_resume_restores_the_grad_scaler(tmp_path):
    whole = make_model()
    make_trainer(whole, "3ep", precision="amp_fp16", optimizers=torch.optim.SGD(whole.parameters(), lr=0.5)).fit()
    first = make_model()
    make_trainer(
        first, "1ep", precision="amp_fp16", optimizers=torch.optim.SGD(first.parameters(), lr=0.5), save_folder=tmp_path
    ).fit()
    resumed = make_model()
    trainer = make_trainer(
        resumed, "3ep", precision="amp_fp16", optimizers=torch.optim.SGD(resumed.parameters(), lr=0.5),
        load_path=tmp_path / "ep1-ba6.pt",
    )  # fmt: skip
    trainer.fit()
    assert_equal_state(snapshot(resumed), snapshot(whole))
    assert trainer._scaler.get_scale() > 0


def test_one_ema_with_several_half_lives_is_evaluated_under_each_label():
    ema = EMA(half_life=("3ba", "9ba"))
    model = make_model()
    trainer = make_trainer(model, "1ep", eval_dataloader=eval_loader(), algorithms=[ema], eval_weights="both")
    trainer.fit()
    last = trainer.state.eval_history[-1]
    for index, label in enumerate(("ema@3ba", "ema@9ba")):
        with ema.ema_weights(model, index=index):
            assert last[f"loss/{label}"] == pytest.approx(manual_eval(model, eval_loader())["loss"], rel=1e-5)
    assert last["loss"] == last["loss/ema@3ba"]  # the default evaluation: the first average


@pytest.mark.parametrize(
    ("kwargs", "max_duration", "expected"),
    [
        ({"half_life": ("2ba", "50ba")}, "100ba", {"ema@50ba": 0.5 ** (100 / 50)}),  # 2ba: 2e-15, quiet
        ({"smoothing": 0.99, "ema_start": "20ba"}, "100ba", {"ema@0.99": 0.99**80}),  # by smoothing, late start
        ({"half_life": "1ep"}, "3ep", {"ema@1ep": 0.5**3}),  # in epochs
    ],
)
def test_a_half_life_too_long_for_the_run_warns_with_the_first_weights_share(kwargs, max_duration, expected):
    trainer = make_trainer(make_model(), max_duration, algorithms=[EMA(**kwargs)])
    with pytest.warns(UserWarning, match="too few for the half-life") as caught:
        trainer.fit()
    message = str(next(w.message for w in caught if "half-life" in str(w.message)))
    for label, share in expected.items():
        assert f"{label} (" in message and f"ends holding {share:.0%}" in message
    assert "ema@2ba" not in message


@pytest.mark.parametrize("kwargs", [{"half_life": "2ba"}, {"half_life": "1000ba", "warmup": "tf"}])
def test_a_short_half_life_or_a_warmup_does_not_warn(kwargs):
    trainer = make_trainer(make_model(), "100ba", algorithms=[EMA(**kwargs)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit()


def test_set_run_length_by_hand_warns_counting_from_ema_start_in_updates():
    with pytest.warns(UserWarning, match=f"500 batches are averaged.*ends holding {0.5**0.5:.0%}"):
        EMA(half_life="1000ba", ema_start="1500ba").set_run_length(2000)
    with pytest.warns(UserWarning, match=f"ends holding {0.99 ** (2000 / 10):.0%}"):
        EMA(smoothing=0.99, update_interval="10ba").set_run_length(2000)  # 200 updates
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMA(half_life="1000ba").set_run_length(20_000)  # 2 ** -20


@pytest.mark.parametrize(("half_life", "max_duration", "batches"), [("0.25dur", "24ba", 6), ("0.5dur", "2ep", 6)])
def test_a_half_life_in_dur_is_that_fraction_of_the_run(half_life, max_duration, batches):
    """``"0.25dur"`` of a 24-batch run is 6 batches: the closed form with ``s = 2 ** (-1 / 6)``."""
    ema = EMA(half_life=half_life)
    recorder = Recorder(ema)
    make_trainer(make_model(), max_duration, algorithms=[ema], callbacks=[recorder]).fit()
    assert ema.smoothing == 2 ** (-1 / batches) and ema.labels == [f"ema@{half_life}"]
    reference = ClosedForm(2 ** (-1 / batches))
    for batch in sorted(recorder.batch_weights):
        reference.update(recorder.batch_weights[batch])
    assert_close_to(snapshot(ema.ema_model), reference.ema)


def test_a_half_life_in_dur_by_hand_needs_the_run_length():
    model, ema = make_model(), EMA(half_life="0.02dur")
    with pytest.raises(RuntimeError, match=r"set_run_length\(total_optimizer_steps\)"):
        ema.update(model)
    assert not ema.started and ema.smoothing is None
    ema.set_run_length(5000)  # 100 batches
    assert ema.smoothing == 2 ** (-1 / 100)
    assert ema.update(model) and ema.started


def test_a_half_life_in_dur_needs_a_run_counted_in_batches():
    trainer = make_trainer(make_model(), "480sp", algorithms=[EMA(half_life="0.1dur")])
    with pytest.raises(ValueError, match=r"max_duration='480sp' does not say how many batches"):
        trainer.fit()
