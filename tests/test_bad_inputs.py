"""One test per bad input of the public API: exception type, a message naming the offence, nothing changed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit import EMA, Algorithm, Callback, Trainer


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


@torch.no_grad()
def step(model: nn.Module, seed: int) -> None:
    """An optimizer step's worth of change to every parameter, and a train-mode forward."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator))
    model.train()
    model(torch.randn(6, 4, generator=generator))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor), name


def ema_snapshot(ema: EMA) -> dict[str, object]:
    state = ema.state_dict()
    weights = {name: t.detach().clone() for name, t in state.pop("weights").items()}
    return {"counters": state, "weights": weights}


def assert_ema_unchanged(ema: EMA, before: dict[str, object]) -> None:
    now = ema_snapshot(ema)
    assert now["counters"] == before["counters"]
    assert_same(before["weights"], now["weights"])  # type: ignore[arg-type]


def started_ema(**kwargs: object) -> tuple[EMA, nn.Module]:
    """An EMA that has started and updated, after 3 batches, and its model (training weights moved on)."""
    model = make_model()
    ema = EMA(**kwargs)  # type: ignore[arg-type]
    for seed in range(3):
        step(model, seed)
        ema.update(model)
    assert ema.started and ema.batches_seen == 3
    return ema, model


# ====================================================================== EMA(...) arguments


@pytest.mark.parametrize("half_life", ["10ba", "1000ba", "2ep"])
def test_ema_with_both_half_life_and_smoothing_raises(half_life: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"half_life={half_life!r}")) as error:
        EMA(half_life=half_life, smoothing=0.9)
    assert "smoothing=0.9" in str(error.value)


def test_ema_with_neither_half_life_nor_smoothing_raises() -> None:
    with pytest.raises(ValueError, match=r"half_life.*smoothing"):
        EMA(half_life=None)
    with pytest.raises(ValueError, match=r"half_life.*smoothing"):
        EMA(half_life=None, smoothing=None)


def test_ema_with_smoothing_alone_is_accepted() -> None:
    ema = EMA(smoothing=0.999)
    assert ema.smoothing == 0.999
    assert str(ema.update_interval) == "1ba"


@pytest.mark.parametrize("half_life", ["100sp", "1000tok", "0dur", "0ba", "0ep"])
def test_ema_half_life_not_positive_batches_epochs_or_fraction_of_the_run_raises(half_life: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"half_life={half_life!r}")):
        EMA(half_life=half_life)


@pytest.mark.parametrize("half_life", ["abc", "10", "1.5ba", "-10ba", ""])
def test_ema_half_life_not_a_time_string_raises(half_life: str) -> None:
    with pytest.raises(ValueError, match=r"half_life.*" + re.escape(repr(half_life))):
        EMA(half_life=half_life)


@pytest.mark.parametrize(
    ("half_life", "update_interval"),
    [("10ba", "1ep"), ("10ep", "1ba"), ("10ba", "5sp"), ("10ba", "0.1dur"), ("0.1dur", "1ep"), ("0.1dur", "0.01dur")],
)
def test_ema_update_interval_in_another_unit_than_half_life_raises(half_life: str, update_interval: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"update_interval={update_interval!r}")):
        EMA(half_life=half_life, update_interval=update_interval)


@pytest.mark.parametrize(
    ("kwargs", "update_interval"),
    [
        ({"half_life": "10ba"}, "0ba"),
        ({"half_life": "10ep"}, "0ep"),
        ({"smoothing": 0.9}, "0ba"),
    ],
)
def test_ema_update_interval_zero_raises(kwargs: dict, update_interval: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"update_interval={update_interval!r}")):
        EMA(update_interval=update_interval, **kwargs)


@pytest.mark.parametrize("update_interval", ["-1ba", "-5ba"])
def test_ema_negative_update_interval_raises(update_interval: str) -> None:
    with pytest.raises(ValueError, match=r"update_interval.*" + re.escape(repr(update_interval))):
        EMA(half_life="10ba", update_interval=update_interval)


@pytest.mark.parametrize("smoothing", [0, 0.0, 1, 1.0, 1.5, -0.5, float("nan"), float("inf"), True], ids=repr)
def test_ema_smoothing_outside_open_unit_interval_raises(smoothing: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"smoothing={smoothing!r}")):
        EMA(smoothing=smoothing)


@pytest.mark.parametrize("ema_start", ["abc", "10", "1.5ba", "2dur", "-1ba", ""])
def test_ema_bad_ema_start_string_raises(ema_start: str) -> None:
    with pytest.raises(ValueError, match=r"ema_start.*" + re.escape(repr(ema_start))):
        EMA(half_life="10ba", ema_start=ema_start)


@pytest.mark.parametrize("ema_start", [10, 0.5, None])
def test_ema_start_not_a_time_raises(ema_start: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ema_start={ema_start!r}")):
        EMA(half_life="10ba", ema_start=ema_start)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 0, "yes", None, "True"], ids=repr)
def test_ema_train_with_ema_weights_not_bool_raises(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"train_with_ema_weights={value!r}")):
        EMA(half_life="10ba", train_with_ema_weights=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("ema_dtype", [torch.int64, torch.bool, "float32", "fp32", "Auto", None], ids=repr)
def test_ema_bad_ema_dtype_raises(ema_dtype: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ema_dtype={ema_dtype!r}")):
        EMA(half_life="10ba", ema_dtype=ema_dtype)  # type: ignore[arg-type]


# ====================================================================== update(model) by hand


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"half_life": "10ep"}, ValueError, "update_interval"),
        ({"half_life": "10ep", "update_interval": "2ep"}, ValueError, "update_interval"),
        ({"smoothing": 0.9, "update_interval": "1ep"}, ValueError, "update_interval"),
        ({"half_life": "10ba", "ema_start": "10ep"}, ValueError, "ema_start='10ep' counts epochs: pass the current"),
        ({"half_life": "10ba", "ema_start": "0.5dur"}, RuntimeError, "ema_start='0.5dur' is a fraction of the run"),
        ({"half_life": "10ba", "ema_start": "100sp"}, ValueError, "ema_start='100sp'"),
    ],
)
def test_update_by_hand_without_the_clock_its_units_need_raises_and_counts_nothing(
    kwargs: dict, error: type, fragment: str
) -> None:
    model = make_model()
    before_model = snapshot(model)
    ema = EMA(**kwargs)
    before = ema_snapshot(ema)
    with pytest.raises(error, match=re.escape(fragment)):
        ema.update(model)
    assert_ema_unchanged(ema, before)
    assert not ema.started and ema.batches_seen == 0 and ema.num_updates == 0
    assert_same(before_model, snapshot(model))


# ====================================================================== EMA weights before the EMA started


def test_ema_weights_before_any_update_raises_runtime_error_and_leaves_model_alone() -> None:
    model = make_model()
    before = snapshot(model)
    ema = EMA(half_life="10ba")
    with pytest.raises(RuntimeError, match="not started"), ema.ema_weights(model):
        pytest.fail("the block must not run without EMA weights")
    assert_same(before, snapshot(model))
    assert not ema.shadow.swapped


def test_get_ema_model_before_any_update_raises_runtime_error() -> None:
    model = make_model()
    before = snapshot(model)
    ema = EMA(half_life="10ba")
    with pytest.raises(RuntimeError, match="not started"):
        ema.get_ema_model(model)
    assert_same(before, snapshot(model))


def test_ema_model_before_any_update_raises_runtime_error() -> None:
    ema = EMA(half_life="10ba")
    with pytest.raises(RuntimeError, match="not started"):
        _ = ema.ema_model


def test_ema_weights_before_ema_start_raises_runtime_error() -> None:
    model = make_model()
    ema = EMA(half_life="10ba", ema_start="5ba")
    for seed in range(4):  # batches 1..4: before ema_start
        step(model, seed)
        assert ema.update(model) is False
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=re.escape("'5ba'")):
        ema.get_ema_model(model)
    with pytest.raises(RuntimeError, match="not started"):
        _ = ema.ema_model
    assert_same(before, snapshot(model))


# ====================================================================== update while swapped in


@pytest.mark.parametrize("update_interval", ["1ba", "2ba"])
def test_update_while_ema_weights_are_swapped_in_raises_and_changes_nothing(update_interval: str) -> None:
    ema, model = started_ema(half_life="10ba", update_interval=update_interval)
    if update_interval == "2ba":
        step(model, 99)
        ema.update(model)  # batch 4: the next batch (5) would not be due
    training = snapshot(model)
    before = ema_snapshot(ema)
    with ema.ema_weights(model):
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update(model)
        # inside, the model still holds the (unchanged) EMA weights
        assert_same(before["weights"], snapshot(model))  # type: ignore[arg-type]
    assert_ema_unchanged(ema, before)
    assert_same(training, snapshot(model))


def test_update_while_get_ema_model_swapped_in_raises_and_changes_nothing() -> None:
    ema, model = started_ema(half_life="10ba")
    training = snapshot(model)
    before = ema_snapshot(ema)
    ema.get_ema_model(model)
    with pytest.raises(RuntimeError, match="swapped"):
        ema.update(model)
    ema.get_training_model(model)
    assert_ema_unchanged(ema, before)
    assert_same(training, snapshot(model))


# ====================================================================== EMA.load_state_dict


@pytest.mark.parametrize("version", [0, 2, None, "1"], ids=repr)
def test_load_state_dict_with_wrong_version_raises_and_changes_nothing(version: object) -> None:
    ema, _ = started_ema(half_life="10ba")
    state = ema.state_dict()
    state["version"] = version
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match=re.escape(f"version {version!r}")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


def test_load_state_dict_without_version_raises() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = ema.state_dict()
    del state["version"]
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match="version"):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


@pytest.mark.parametrize("state", [None, [], "state", 3], ids=repr)
def test_load_state_dict_of_a_non_dict_raises(state: object) -> None:
    ema, _ = started_ema(half_life="10ba")
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match="version"):
        ema.load_state_dict(state)  # type: ignore[arg-type]
    assert_ema_unchanged(ema, before)


def test_load_state_dict_missing_keys_raises_naming_them() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = ema.state_dict()
    del state["weights"], state["num_updates"]
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match=r"num_updates.*weights"):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


def _other_state(ema: EMA) -> dict:
    """A valid state of the same model, with other counters and weights."""
    state = ema.state_dict()
    state["num_updates"] += 5
    state["batches_seen"] += 7
    state["weights"] = {
        name: t.clone() + 1 if t.is_floating_point() else t.clone() for name, t in state["weights"].items()
    }
    return state


def test_load_state_dict_with_a_renamed_tensor_raises_naming_it_and_changes_nothing() -> None:
    ema, model = started_ema(half_life="10ba")
    state = _other_state(ema)
    state["weights"]["2.kernel"] = state["weights"].pop("2.weight")
    before, training = ema_snapshot(ema), snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'2.weight'")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)
    assert_same(training, snapshot(model))


def test_load_state_dict_with_a_missing_tensor_raises_naming_it_and_changes_nothing() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = _other_state(ema)
    del state["weights"]["1.running_var"]
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match=re.escape("'1.running_var'")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


def test_load_state_dict_with_an_extra_tensor_raises_naming_it_and_changes_nothing() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = _other_state(ema)
    state["weights"]["3.weight"] = torch.zeros(2, 3)
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match=re.escape("'3.weight'")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


def test_load_state_dict_with_another_shape_raises_naming_it_and_changes_nothing() -> None:
    ema, model = started_ema(half_life="10ba")
    state = _other_state(ema)
    state["weights"]["0.bias"] = torch.zeros(7)
    before, training = ema_snapshot(ema), snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'0.bias'")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)
    assert_same(training, snapshot(model))


def test_load_state_dict_with_non_tensor_weights_raises() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = _other_state(ema)
    state["weights"]["0.bias"] = [0.0] * 5
    before = ema_snapshot(ema)
    with pytest.raises(ValueError, match=re.escape("'0.bias'")):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)


def test_load_state_dict_while_swapped_in_raises_and_changes_nothing() -> None:
    ema, model = started_ema(half_life="10ba")
    state = _other_state(ema)
    training = snapshot(model)
    before = ema_snapshot(ema)
    with ema.ema_weights(model), pytest.raises(RuntimeError, match="swapped"):
        ema.load_state_dict(state)
    assert_ema_unchanged(ema, before)
    assert_same(training, snapshot(model))


def test_fresh_ema_loading_a_mismatching_state_raises_at_first_use_naming_the_tensor() -> None:
    ema, _ = started_ema(half_life="10ba")
    state = ema.state_dict()
    state["weights"]["0.weight"] = torch.zeros(5, 9)
    fresh = EMA(half_life="10ba")
    fresh.load_state_dict(state)  # no model seen yet: checked when the model comes
    model = make_model(seed=1)
    before_model = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("'0.weight'")):
        fresh.get_ema_model(model)
    assert_same(before_model, snapshot(model))
    before = ema_snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape("'0.weight'")):
        fresh.update(model)
    assert_ema_unchanged(fresh, before)
    assert_same(before_model, snapshot(model))


# ====================================================================== Trainer(...) arguments


def loader(size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(size, 4, generator=generator), torch.randint(0, 3, (size,), generator=generator))
    return DataLoader(data, batch_size=4)


class Tracked:
    """A classifier model and what must not change when a Trainer refuses its arguments."""

    def __init__(self) -> None:
        self.model = emakit.Classifier(make_model())
        self.params = list(self.model.parameters())
        self.weights = snapshot(self.model)
        self.rng = torch.get_rng_state()

    def assert_unchanged(self) -> None:
        assert all(a is b for a, b in zip(self.params, self.model.parameters(), strict=True))
        assert_same(self.weights, snapshot(self.model))
        assert torch.equal(torch.get_rng_state(), self.rng), "the global torch RNG was reseeded"


def test_trainer_model_without_loss_raises() -> None:
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="loss"):
        Trainer(model=model, train_dataloader=loader(), max_duration="1ep")
    assert_same(before, snapshot(model))


def test_trainer_model_not_a_module_raises() -> None:
    with pytest.raises(ValueError, match=re.escape("nn.Module")):
        Trainer(model=lambda batch: batch, train_dataloader=loader(), max_duration="1ep")


@pytest.mark.parametrize(
    "max_duration", ["0.5dur", "1dur", "0ba", "0ep", "abc", "1.5ep", "-1ep", 0, -1, None], ids=repr
)
def test_trainer_bad_max_duration_raises(max_duration: object) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=r"max_duration.*" + re.escape(repr(max_duration))):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration=max_duration)
    tracked.assert_unchanged()


@pytest.mark.parametrize("precision", ["fp16", "amp_fp8", "bf16", "FP32", None], ids=repr)
def test_trainer_unsupported_precision_raises(precision: object) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=re.escape(f"precision={precision!r}")) as error:
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", precision=precision)
    assert "amp_bf16" in str(error.value)  # names what is supported
    tracked.assert_unchanged()


@pytest.mark.parametrize("eval_interval", ["1sp", "10tok", "0.5dur", "0ep", "0ba", "abc", 0, -1], ids=repr)
def test_trainer_bad_eval_interval_raises(eval_interval: object) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=r"eval_interval.*" + re.escape(repr(eval_interval))):
        Trainer(
            model=tracked.model,
            train_dataloader=loader(),
            eval_dataloader=loader(),
            max_duration="1ep",
            eval_interval=eval_interval,
        )  # type: ignore[arg-type]
    tracked.assert_unchanged()


@pytest.mark.parametrize("save_interval", ["1sp", "0.5dur", "0ep"])
def test_trainer_bad_save_interval_raises(save_interval: str) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=re.escape(f"save_interval={save_interval!r}")):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", save_interval=save_interval)
    tracked.assert_unchanged()


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True], ids=repr)
def test_trainer_bad_seed_raises(seed: object) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=re.escape(f"seed={seed!r}")):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", seed=seed)
    tracked.assert_unchanged()


def test_trainer_autoresume_without_save_folder_raises() -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=r"autoresume.*save_folder"):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", autoresume=True)
    tracked.assert_unchanged()


@pytest.mark.parametrize("train_dataloader", [5, None, object()], ids=lambda v: type(v).__name__)
def test_trainer_non_iterable_train_dataloader_raises(train_dataloader: object) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=r"train_dataloader must be iterable.*" + type(train_dataloader).__name__):
        Trainer(model=tracked.model, train_dataloader=train_dataloader, max_duration="1ep")
    tracked.assert_unchanged()


def test_trainer_empty_train_dataloader_raises() -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match="no batches"):
        Trainer(model=tracked.model, train_dataloader=[], max_duration="1ep")
    tracked.assert_unchanged()


@pytest.mark.parametrize(
    "algorithms",
    [[object()], [Callback()], ["EMA"], [EMA(half_life="10ba"), 3], [EMA]],
    ids=["object", "callback", "string", "ema-and-int", "the-ema-class"],
)
def test_trainer_algorithms_that_are_not_algorithms_raise(algorithms: list) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=re.escape("algorithms must be emakit.Algorithm")) as raised:
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", algorithms=algorithms)
    assert isinstance(raised.value, TypeError)  # a wrong kind of object; a ValueError as before the protocol
    assert repr(algorithms[-1]) in str(raised.value)
    tracked.assert_unchanged()


def test_trainer_algorithms_whose_as_algorithm_gives_no_algorithm_raise() -> None:
    class Pretender:
        def as_algorithm(self) -> str:
            return "not an algorithm"

    tracked = Tracked()
    with pytest.raises(TypeError, match=r"as_algorithm\(\) returned 'not an algorithm'"):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", algorithms=[Pretender()])
    tracked.assert_unchanged()


@pytest.mark.parametrize(
    "callbacks",
    [[object()], [EMA(half_life="10ba")], [print]],
    ids=["object", "algorithm", "function"],
)
def test_trainer_callbacks_that_are_not_callbacks_raise(callbacks: list) -> None:
    tracked = Tracked()
    with pytest.raises(ValueError, match=re.escape("callbacks must be emakit.Callback")):
        Trainer(model=tracked.model, train_dataloader=loader(), max_duration="1ep", callbacks=callbacks)
    tracked.assert_unchanged()


def test_trainer_accepts_algorithm_and_callback_subclasses() -> None:
    class Counter(Algorithm):
        def match(self, event, state):
            return False

        def apply(self, event, state, logger):
            pass

    tracked = Tracked()
    trainer = Trainer(
        model=tracked.model,
        train_dataloader=loader(),
        max_duration="1ba",
        algorithms=[Counter()],
        callbacks=[Callback()],
        seed=0,
        progress_bar=False,
    )
    trainer.fit()
    assert trainer.state.timestamp.batch == 1
