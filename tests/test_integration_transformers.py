"""emakit.integrations.transformers with the real Hugging Face Trainer, on a tiny GPT-2, on CPU."""

from __future__ import annotations

import itertools
import logging
import os
import shutil

import pytest
import torch
from closed_form import ClosedForm

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    EarlyStoppingCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from emakit import EMA  # noqa: E402
from emakit.integrations.transformers import EMA_STATE_NAME, EMATrainer, EMATrainerCallback  # noqa: E402

STEPS = 12
SMOOTHING_4BA = 2 ** (-1 / 4)  # half_life="4ba", one update per optimizer step


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def make_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-2,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(TrainerCallback):
    """The model's state_dict after every optimizer step (float32 copies), and ``state.epoch`` there."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epochs: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.epochs.append(state.epoch)


class EvaluateRecorder(TrainerCallback):
    """The metrics of every on_evaluate event, with its step."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict[str, float]]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append((state.global_step, dict(metrics)))


class WarningRecords(logging.Handler):
    """Collects the warnings transformers logs (its loggers do not propagate to the root, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def closed_form(steps: list[dict[str, torch.Tensor]], smoothing: float) -> dict[str, torch.Tensor]:
    reference = ClosedForm(smoothing)
    for weights in steps:
        reference.update({k: v.double() for k, v in weights.items()})
    return reference.ema


def assert_average(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() <= expected.keys()
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), name


def plain_eval(model: GPT2LMHeadModel, state: dict[str, torch.Tensor], dataset, tmp_path) -> float:
    """The eval loss of a fresh copy of the model holding ``state`` (float64 values rounded to the model's float32),
    by a plain Trainer."""
    copy = make_model()
    copy.load_state_dict({k: v.float() for k, v in state.items()})
    return Trainer(model=copy, args=make_args(tmp_path / "plain")).evaluate(dataset)["eval_loss"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_average_is_the_closed_form_of_each_optimizer_step(tmp_path, accumulation):
    recorder, ema = Recorder(), EMA(half_life="4ba")
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path, gradient_accumulation_steps=accumulation),
        train_dataset=make_data(96, seed=1),
        callbacks=[recorder],
        ema=ema,
    )
    trainer.train()
    assert len(recorder.steps) == STEPS  # one update per optimizer step, not per micro-batch
    assert (ema.num_updates, ema.batches_seen) == (STEPS, STEPS)
    assert ema.smoothing == SMOOTHING_4BA
    assert_average(ema.ema_model.state_dict(), closed_form(recorder.steps, SMOOTHING_4BA))
    assert_equal(trainer.model.state_dict(), recorder.steps[-1])  # the model holds its training weights
    assert not torch.equal(ema.ema_model.transformer.wte.weight, trainer.model.transformer.wte.weight)


def test_a_half_life_too_long_for_the_run_warns_with_the_optimizer_steps(tmp_path):
    trainer = EMATrainer(
        model=make_model(), args=make_args(tmp_path), train_dataset=make_data(96, seed=1), ema=EMA(half_life="100ba")
    )
    with pytest.warns(UserWarning, match=f"{STEPS} batches are averaged.*ema@100ba \\(100 batches\\) ends holding"):
        trainer.train()


def test_a_half_life_in_dur_is_a_fraction_of_max_steps(tmp_path):
    recorder, ema = Recorder(), EMA(half_life="0.25dur")
    EMATrainer(
        model=make_model(), args=make_args(tmp_path), train_dataset=make_data(96, seed=1), callbacks=[recorder], ema=ema
    ).train()
    smoothing = 2 ** (-1 / 3)  # 0.25 of the 12 steps
    assert ema.smoothing == smoothing
    assert_average(ema.ema_model.state_dict(), closed_form(recorder.steps, smoothing))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ema_start_in_epochs_starts_at_the_first_step_of_that_epoch(tmp_path, accumulation):
    recorder, ema = Recorder(), EMA(smoothing=0.8, ema_start="1ep")
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path, gradient_accumulation_steps=accumulation),
        train_dataset=make_data(24 * accumulation, seed=1),  # 6 optimizer steps an epoch: STEPS make 2 epochs
        callbacks=[recorder],
        ema=ema,
    )
    trainer.train()
    # on_step_end sees the fractional epoch, reaching 1.0 at the last step of the first epoch (epoch 0)
    assert recorder.epochs[0] == pytest.approx(1 / 6) and recorder.epochs[5] == 1.0
    assert recorder.epochs[6] == pytest.approx(1 + 1 / 6)
    assert ema.num_updates == 6  # steps 7-12: the average starts at the first step of epoch 1
    assert_average(ema.ema_model.state_dict(), closed_form(recorder.steps[6:], 0.8))


def test_evaluations_measure_the_average_and_both(tmp_path):
    evals = {"a": make_data(16, seed=2), "b": make_data(16, seed=3)}
    recorder, events, ema = Recorder(), EvaluateRecorder(), EMA(half_life="4ba")
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path / "out", eval_strategy="steps", eval_steps=STEPS, eval_on_start=True),
        train_dataset=make_data(48, seed=1),
        eval_dataset=evals,
        callbacks=[recorder, events],
        ema=ema,
        eval_weights="both",
    )
    trainer.train()
    average, weights = closed_form(recorder.steps, SMOOTHING_4BA), recorder.steps[-1]
    # one event per dataset and evaluation, the average's and the training weights' metrics together
    assert [(step, sorted(k for k in metrics if k.endswith("_loss"))) for step, metrics in events.events] == [
        (0, ["eval_a_loss"]),
        (0, ["eval_b_loss"]),
        (STEPS, ["eval_a_loss", "eval_a_training_loss"]),
        (STEPS, ["eval_b_loss", "eval_b_training_loss"]),
    ]
    start = make_model().state_dict()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if entry.get("step") == STEPS}
    first = {k: v for entry in trainer.state.log_history for k, v in entry.items() if entry.get("step") == 0}
    called = trainer.evaluate()
    called_one = trainer.evaluate(evals["b"], metric_key_prefix="test")
    for name, dataset in evals.items():
        expected_ema = plain_eval(trainer.model, average, dataset, tmp_path)
        expected_training = plain_eval(trainer.model, weights, dataset, tmp_path)
        assert expected_ema != pytest.approx(expected_training, rel=1e-3)
        assert logged[f"eval_{name}_loss"] == pytest.approx(expected_ema, rel=1e-5)
        assert logged[f"eval_{name}_training_loss"] == pytest.approx(expected_training, rel=1e-6)
        assert called[f"eval_{name}_loss"] == pytest.approx(expected_ema, rel=1e-5)
        assert called[f"eval_{name}_training_loss"] == pytest.approx(expected_training, rel=1e-6)
        # eval_on_start: the average has not started, so the training (initial) weights, under the usual names
        assert first[f"eval_{name}_loss"] == pytest.approx(plain_eval(trainer.model, start, dataset, tmp_path))
        assert f"eval_{name}_training_loss" not in first
    assert called_one["test_loss"] == pytest.approx(plain_eval(trainer.model, average, evals["b"], tmp_path), rel=1e-5)
    assert called_one["test_training_loss"] == pytest.approx(plain_eval(trainer.model, weights, evals["b"], tmp_path))
    assert_equal(trainer.model.state_dict(), weights)  # evaluations leave the training weights bit for bit
    assert len(events.events) == 4 + 2 + 1  # the two calls after training: one event per dataset


def test_eval_weights_both_is_one_evaluation_event_that_early_stopping_and_the_best_model_read(tmp_path):
    recorder, events, warned = Recorder(), EvaluateRecorder(), WarningRecords()
    dataset = make_data(16, seed=2)
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=6,
            save_strategy="steps",
            save_steps=6,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
        ),
        train_dataset=make_data(48, seed=1),
        eval_dataset=dataset,
        callbacks=[recorder, events, EarlyStoppingCallback(early_stopping_patience=3)],
        ema=EMA(half_life="4ba"),
        eval_weights="both",
    )
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(warned)
    try:
        trainer.train()
    finally:
        library_logger.removeHandler(warned)
    assert not [m for m in warned.messages if "metric_for_best_model" in m or "did not find" in m], warned.messages
    assert [step for step, _ in events.events] == [6, 12]  # one on_evaluate per evaluation
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry or "eval_training_loss" in entry]
    assert [entry["step"] for entry in logged] == [6, 12]  # one log entry per evaluation
    for (step, metrics), entry in zip(events.events, logged, strict=True):
        assert metrics.keys() >= {"eval_loss", "eval_training_loss", "eval_runtime"}
        assert (
            entry["eval_loss"] == metrics["eval_loss"] and entry["eval_training_loss"] == metrics["eval_training_loss"]
        )
        expected_ema = plain_eval(trainer.model, closed_form(recorder.steps[:step], SMOOTHING_4BA), dataset, tmp_path)
        expected_training = plain_eval(trainer.model, recorder.steps[step - 1], dataset, tmp_path)
        assert expected_ema != pytest.approx(expected_training, rel=1e-3)
        assert metrics["eval_loss"] == pytest.approx(expected_ema, rel=1e-5)
        assert metrics["eval_training_loss"] == pytest.approx(expected_training, rel=1e-6)
    best = min(events.events, key=lambda event: event[1]["eval_loss"])
    assert trainer.state.best_metric == best[1]["eval_loss"]  # ranked by the average's loss
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best[0]}")


def test_eval_weights_training_measures_the_training_weights(tmp_path):
    dataset = make_data(16, seed=2)
    recorder = Recorder()
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path / "out"),
        train_dataset=make_data(48, seed=1),
        callbacks=[recorder],
        ema=EMA(half_life="4ba"),
        eval_weights="training",
    )
    trainer.train()
    metrics = trainer.evaluate(dataset)
    assert metrics["eval_loss"] == pytest.approx(plain_eval(trainer.model, recorder.steps[-1], dataset, tmp_path))
    assert "eval_training_loss" not in metrics


def short_ema_trainer(output_dir, **kwargs) -> EMATrainer:
    """An EMATrainer of 4 steps, no evaluations during training."""
    args = make_args(output_dir, max_steps=4)
    return EMATrainer(
        model=make_model(), args=args, train_dataset=make_data(16, seed=1), ema=EMA(half_life="4ba"), **kwargs
    )


@pytest.mark.parametrize("value", ["ema", "training", "both"])
def test_ema_eval_is_deprecated_and_means_eval_weights(tmp_path, value):
    dataset = make_data(16, seed=2)
    metrics = {}
    for spelling in ("ema_eval", "eval_weights"):
        if spelling == "ema_eval":
            message = rf"EMATrainer\(ema_eval='{value}'\) is deprecated.*use EMATrainer\(eval_weights='{value}'\)"
            with pytest.warns(DeprecationWarning, match=message) as warned:
                trainer = short_ema_trainer(tmp_path / spelling, ema_eval=value)
            assert warned[0].filename == __file__
        else:
            trainer = short_ema_trainer(tmp_path / spelling, eval_weights=value)
        assert trainer.eval_weights == value
        trainer.train()
        metrics[spelling] = {k: v for k, v in trainer.evaluate(dataset).items() if k.endswith("_loss")}
    assert metrics["ema_eval"] == metrics["eval_weights"]  # the same names, the same numbers
    assert sorted(metrics["ema_eval"]) == (["eval_loss", "eval_training_loss"] if value == "both" else ["eval_loss"])
    with pytest.warns(DeprecationWarning, match=r"EMATrainer.ema_eval is deprecated.*EMATrainer.eval_weights"):
        assert trainer.ema_eval == value
    with pytest.warns(DeprecationWarning, match="ema_eval"):
        trainer.ema_eval = "training"
    assert trainer.eval_weights == "training"


class PredictRecorder(TrainerCallback):
    """The metrics of every on_predict event."""

    def __init__(self) -> None:
        self.events: list[dict[str, float]] = []

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self.events.append(dict(metrics))


def plain_predict(state: dict[str, torch.Tensor], dataset, tmp_path):
    """``predict`` of a plain Trainer on a fresh copy of the model holding ``state``."""
    copy = make_model()
    copy.load_state_dict({k: v.float() for k, v in state.items()})
    return Trainer(model=copy, args=make_args(tmp_path / "plain")).predict(dataset)


def assert_same_predictions(actual, expected) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eval_weights", ["ema", "training", "both"])
def test_predict_follows_eval_weights(tmp_path, eval_weights):
    dataset, recorder, predicted = make_data(16, seed=2), Recorder(), PredictRecorder()
    trainer = short_ema_trainer(tmp_path / "out", eval_weights=eval_weights, callbacks=[recorder, predicted])
    trainer.train()
    weights = recorder.steps[-1]
    average = {k: v.clone() for k, v in trainer.ema.ema_model.state_dict().items()}  # the average loaded by hand
    by_average, by_weights = plain_predict(average, dataset, tmp_path), plain_predict(weights, dataset, tmp_path)
    assert not torch.allclose(torch.as_tensor(by_average.predictions), torch.as_tensor(by_weights.predictions))
    assert by_average.metrics["test_loss"] != pytest.approx(by_weights.metrics["test_loss"], rel=1e-3)

    output = trainer.predict(dataset)

    expected = by_weights if eval_weights == "training" else by_average
    assert_same_predictions(output.predictions, expected.predictions)
    assert_same_predictions(output.label_ids, by_average.label_ids)
    assert output.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-6)
    losses = sorted(k for k in output.metrics if k.endswith("_loss"))
    if eval_weights == "both":  # evaluate's names: the average under test_*, the training weights under test_training_*
        assert losses == ["test_loss", "test_training_loss"]
        assert output.metrics["test_training_loss"] == pytest.approx(by_weights.metrics["test_loss"], rel=1e-6)
        assert {"test_runtime", "test_samples_per_second"} <= output.metrics.keys()
        assert not [k for k in output.metrics if k.startswith("test_training_") and k != "test_training_loss"]
    else:
        assert losses == ["test_loss"]
    assert predicted.events == [output.metrics]  # one on_predict, holding every metric
    assert_equal(trainer.model.state_dict(), weights)  # the training weights are back, bit for bit
    assert not trainer.ema.swapped


@pytest.mark.parametrize("eval_weights", ["ema", "both"])
def test_predict_before_the_average_starts_uses_the_training_weights(tmp_path, eval_weights):
    dataset, recorder = make_data(16, seed=2), Recorder()
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path / "out", max_steps=4),
        train_dataset=make_data(16, seed=1),
        callbacks=[recorder],
        ema=EMA(half_life="4ba", ema_start="1ep"),  # 4 steps an epoch: the run ends before it starts
        eval_weights=eval_weights,
    )
    trainer.train()
    assert not trainer.ema.started
    weights = recorder.steps[-1]
    assert not torch.equal(weights["transformer.wte.weight"], make_model().transformer.wte.weight)  # trained
    output = trainer.predict(dataset)
    expected = plain_predict(weights, dataset, tmp_path)
    assert_same_predictions(output.predictions, expected.predictions)
    assert output.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-6)
    assert "test_training_loss" not in output.metrics  # as evaluate: the usual names only
    assert_equal(trainer.model.state_dict(), weights)


@pytest.mark.parametrize(("eval_weights", "failing_pass"), [("ema", 1), ("both", 1), ("both", 2)])
def test_predict_that_raises_leaves_the_training_weights(tmp_path, eval_weights, failing_pass):
    dataset, recorder, passes = make_data(16, seed=2), Recorder(), itertools.count(1)

    def compute_metrics(prediction):
        if next(passes) == failing_pass:
            raise RuntimeError("metric failed")
        return {}

    trainer = short_ema_trainer(
        tmp_path / "out", eval_weights=eval_weights, callbacks=[recorder], compute_metrics=compute_metrics
    )
    trainer.train()
    with pytest.raises(RuntimeError, match="metric failed"):
        trainer.predict(dataset)
    assert_equal(trainer.model.state_dict(), recorder.steps[-1])
    assert not trainer.ema.swapped
    trainer.compute_metrics = None
    after = trainer.predict(dataset)  # the next call starts afresh
    by_average = plain_predict(trainer.ema.ema_model.state_dict(), dataset, tmp_path)
    assert_same_predictions(after.predictions, by_average.predictions)
    assert ("test_training_loss" in after.metrics) == (eval_weights == "both")
    assert_equal(trainer.model.state_dict(), recorder.steps[-1])


def test_checkpoint_holds_training_weights_when_evaluation_and_saving_coincide(tmp_path):
    recorder, ema = Recorder(), EMA(half_life="4ba")
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path, eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=6),
        train_dataset=make_data(48, seed=1),
        eval_dataset=make_data(16, seed=2),
        callbacks=[recorder],
        ema=ema,
    )
    trainer.train()
    for step in (6, 12):
        folder = tmp_path / f"checkpoint-{step}"
        saved = load_file(folder / "model.safetensors")
        assert_equal(saved, recorder.steps[step - 1])
        state = torch.load(folder / EMA_STATE_NAME, weights_only=True)
        assert (state["num_updates"], state["batches_seen"]) == (step, step)
        expected = closed_form(recorder.steps[:step], SMOOTHING_4BA)
        assert_average(state["weights"], {k: expected[k] for k in state["weights"]})
        assert not torch.equal(state["weights"]["transformer.wte.weight"], saved["transformer.wte.weight"])


def test_resume_is_bit_for_bit(tmp_path):
    def run(output_dir, resume=None):
        ema = EMA(half_life="4ba")
        trainer = EMATrainer(
            model=make_model(),
            args=make_args(output_dir, save_strategy="steps", save_steps=5, eval_strategy="steps", eval_steps=5),
            train_dataset=make_data(40, seed=1),  # 10 batches an epoch: the resume lands mid-epoch
            eval_dataset=make_data(16, seed=2),
            ema=ema,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, ema

    whole, whole_ema = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    resumed, resumed_ema = run(tmp_path / "resumed", resume=True)
    assert_equal(resumed.model.state_dict(), whole.model.state_dict())
    a, b = whole_ema.state_dict(), resumed_ema.state_dict()
    assert {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}
    assert_equal(b["weights"], a["weights"])
    assert a["num_updates"] == STEPS

    at_epoch_end, at_epoch_end_ema = run(tmp_path / "path", resume=str(tmp_path / "whole" / "checkpoint-10"))
    assert_equal(at_epoch_end.model.state_dict(), whole.model.state_dict())
    assert_equal(at_epoch_end_ema.state_dict()["weights"], a["weights"])


def test_resume_without_ema_state_raises(tmp_path):
    trainer = Trainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=make_data(8, seed=1),
    )
    trainer.train()
    resumed = EMATrainer(model=make_model(), args=make_args(tmp_path), train_dataset=make_data(8, seed=1), ema=EMA())
    with pytest.raises(FileNotFoundError, match=EMA_STATE_NAME):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_save_ema_model_loads_with_from_pretrained(tmp_path):
    recorder, ema = Recorder(), EMA(smoothing=0.8)
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(tmp_path / "out"),
        train_dataset=make_data(48, seed=1),
        callbacks=[recorder],
        ema=ema,
    )
    with pytest.raises(RuntimeError, match="not started"):
        trainer.save_ema_model(tmp_path / "early")
    trainer.train()
    trainer.save_ema_model(tmp_path / "ema")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "ema")
    assert_equal(loaded.state_dict(), ema.ema_model.state_dict())
    assert_average(loaded.state_dict(), closed_form(recorder.steps, 0.8))
    assert_equal(trainer.model.state_dict(), recorder.steps[-1])


def test_callback_alone_with_a_plain_trainer(tmp_path):
    recorder, callback = Recorder(), EMATrainerCallback(EMA(half_life="4ba"))
    trainer = Trainer(
        model=make_model(),
        args=make_args(tmp_path, save_strategy="steps", save_steps=6),
        train_dataset=make_data(48, seed=1),
        callbacks=[recorder, callback],
    )
    trainer.train()
    assert_average(callback.ema.ema_model.state_dict(), closed_form(recorder.steps, SMOOTHING_4BA))
    other = EMATrainerCallback(EMA(half_life="4ba"))
    other.load_state(tmp_path / "checkpoint-12")
    assert_equal(other.ema.state_dict()["weights"], callback.ema.state_dict()["weights"])


def test_save_state_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    callback = EMATrainerCallback(EMA(smoothing=0.8))
    callback.ema.update(make_model())
    path = callback.save_state(tmp_path)
    assert path == tmp_path / EMA_STATE_NAME and os.listdir(tmp_path) == [EMA_STATE_NAME]
    saved, first = path.read_bytes(), {k: v.clone() for k, v in callback.ema.state_dict()["weights"].items()}
    real_save = torch.save

    def save_then_fail(obj, file, *args, **kwargs):  # the state is written, then the write fails (disk full)
        real_save(obj, file, *args, **kwargs)
        raise OSError("No space left on device")

    callback.ema.update(make_model())
    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        callback.save_state(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [EMA_STATE_NAME], "a partial file was left behind"
    assert path.read_bytes() == saved  # the old state, whole
    other = EMATrainerCallback(EMA(smoothing=0.8))
    other.load_state(tmp_path)
    assert_equal(other.ema.state_dict()["weights"], first)


def test_load_best_model_at_end_loads_the_best_average(tmp_path):
    ema, evaluations = EMA(half_life="2ba"), itertools.count()
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=4,
            save_strategy="steps",
            save_steps=4,
            load_best_model_at_end=True,
            metric_for_best_model="eval_earliness",
            greater_is_better=True,
        ),
        train_dataset=make_data(48, seed=1),
        eval_dataset=make_data(16, seed=2),
        compute_metrics=lambda prediction: {"earliness": -next(evaluations)},  # the first checkpoint is best
        ema=ema,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-4")
    saved = torch.load(f"{best}/{EMA_STATE_NAME}", weights_only=True)
    assert_equal(ema.state_dict()["weights"], saved["weights"])
    assert ema.num_updates == saved["num_updates"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ema": EMA(), "eval_weights": "average"}, ValueError, "eval_weights='average' must be one of 'ema', "),
        ({"ema": EMA(), "ema_eval": "average"}, ValueError, "ema_eval='average' must be one of 'ema', "),
        ({"ema": EMA(), "ema_eval": "both", "eval_weights": "training"}, ValueError, "disagree"),
        ({"ema": 0.999}, TypeError, "emakit.EMA"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        EMATrainer(model=make_model(), args=make_args(tmp_path), **kwargs)
    if "ema" in kwargs and not isinstance(kwargs["ema"], EMA):
        with pytest.raises(TypeError, match="float"):
            EMATrainerCallback(0.999)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_hold_the_same_average(tmp_path):
    from pathlib import Path

    from torchrun import torchrun

    script = Path(__file__).with_name("hf_ddp_script.py")
    # the tests' folder first, then the caller's path: the emakit under test, not another one installed
    path = os.pathsep.join(filter(None, [str(script.parent), os.environ.get("PYTHONPATH")]))
    result = torchrun(script, str(tmp_path), timeout=180, PYTHONPATH=path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_equal(ranks[1]["ema"]["weights"], ranks[0]["ema"]["weights"])
    assert_equal(ranks[1]["model"], ranks[0]["model"])
    assert ranks[0]["ema"]["num_updates"] == ranks[1]["ema"]["num_updates"] == 6
    for key in ("eval_loss", "eval_training_loss"):  # the eval set is split across ranks and the loss gathered
        assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]
    assert ranks[0]["ema"]["smoothing"] == SMOOTHING_4BA
    expected = closed_form(ranks[0]["steps"], SMOOTHING_4BA)
    assert_average(ranks[0]["ema"]["weights"], {k: expected[k] for k in ranks[0]["ema"]["weights"]})
    assert ranks[0]["metrics"]["eval_loss"] != ranks[0]["metrics"]["eval_training_loss"]
    saved = torch.load(tmp_path / "checkpoint-6" / EMA_STATE_NAME, weights_only=True)
    assert_equal(saved["weights"], ranks[0]["ema"]["weights"])


@pytest.mark.parametrize("eval_weights", ["ema", "both"])
def test_training_with_evaluations_follows_a_plain_trainer_bit_for_bit(tmp_path, eval_weights):
    """GPT-2's dropout draws from torch's generator, as does every pass over a DataLoader: the second evaluation
    loop of eval_weights="both" must not shift the random numbers of the steps after it."""

    def run(cls, **kwargs):
        args = make_args(tmp_path / cls.__name__, max_steps=6, eval_strategy="steps", eval_steps=3)
        trainer = cls(
            model=make_model(), args=args, train_dataset=make_data(48, seed=1), eval_dataset=make_data(16, seed=2),
            **kwargs,
        )  # fmt: skip
        trainer.train()
        return trainer.model.state_dict()

    plain = run(Trainer)
    assert_equal(run(EMATrainer, ema=EMA(half_life="4ba"), eval_weights=eval_weights), plain)
