"""EMA used by hand, without a Trainer: ``ema.update(model)`` once per optimizer step.

Every check compares against the closed form, computed in float64 from the training weights
recorded after each optimizer step::

    first update event:  ema = w
    later events:        ema = s * ema + (1 - s) * w,    s = 2 ** (-(update_interval / half_life))
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA, Classifier

ATOL, RTOL = 1e-6, 1e-5  # fp32 EMA arithmetic against a float64 reference


# ----------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, batchnorm: bool = False) -> Classifier:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return Classifier(nn.Sequential(*layers))


def make_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad()
    model.loss(model(batch), batch).backward()
    optimizer.step()


def train_and_average(model, optimizer, ema, reference, batches) -> None:
    """Per batch: an optimizer step, the closed form's update, and the EMA's."""
    for batch in batches:
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        ema.update(model)


def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state, in float64 (exact for fp32, bf16 and fp64 values)."""
    state = model.state_dict()
    return {k: v.detach().to(torch.float64).clone() for k, v in state.items() if v.is_floating_point()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_to(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol) -> None:
    tol = {"atol": ATOL, "rtol": RTOL, **tol}
    assert expected, "nothing to compare"
    for name, value in expected.items():
        assert name in actual, f"{name} missing"
        torch.testing.assert_close(actual[name].detach().to(torch.float64), value, msg=name, **tol)


def assert_equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def ema_state(ema: EMA, model: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights as the model holds them inside ``ema_weights``."""
    with ema.ema_weights(model):
        return snapshot(model)


# ------------------------------------------------------------------- closed form
def test_every_batch_update_matches_closed_form_in_ema_model_and_inside_ema_weights():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="10ba")
    assert ema.smoothing == pytest.approx(2 ** (-1 / 10))
    reference = ClosedForm(2 ** (-1 / 10))
    for batch in make_batches(20):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        assert ema.update(model) is True
        assert_close_to(ema.ema_model.state_dict(), reference.ema)
        assert_close_to(ema_state(ema, model), reference.ema)


def test_update_interval_updates_only_when_the_batch_count_is_a_multiple():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="10ba", update_interval="3ba")
    reference = ClosedForm(2 ** (-3 / 10))
    assert ema.smoothing == pytest.approx(reference.smoothing)
    returned = []
    for step, batch in enumerate(make_batches(20), start=1):
        train_step(model, optimizer, batch)
        if step % 3 == 0:
            reference.update(weights64(model))
        returned.append(ema.update(model))
        if reference.ema is not None:
            assert_close_to(ema.ema_model.state_dict(), reference.ema)
    assert returned == [step % 3 == 0 for step in range(1, 21)]


def test_a_batch_counted_without_an_update_is_skipped_by_the_average():
    """``update(model, due=False)``: the batch counts (for ``ema_start``), the average does not move."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema, reference = EMA(smoothing=0.8, ema_start="2ba"), ClosedForm(0.8)
    chosen = {2, 3, 5, 8}
    for step, batch in enumerate(make_batches(9), start=1):
        train_step(model, optimizer, batch)
        if step in chosen:
            reference.update(weights64(model))
        assert ema.update(model, due=step in chosen) == (step in chosen)
    assert ema.batches_seen == 9 and ema.num_updates == len(chosen)
    assert_close_to(ema.ema_model.state_dict(), reference.ema)


@pytest.mark.parametrize(("interval", "first"), [("1ba", 5), ("3ba", 6), ("5ba", 5)])
def test_ema_start_initialises_at_the_first_due_batch_at_or_after_it(interval, first):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="10ba", ema_start="5ba", update_interval=interval)
    every = int(interval[:-2])
    reference = ClosedForm(2 ** (-every / 10))
    returned = []
    for step, batch in enumerate(make_batches(16), start=1):
        train_step(model, optimizer, batch)
        due = step >= first and step % every == 0
        if due:
            reference.update(weights64(model))
        returned.append(ema.update(model))
        if step == first:  # the start copies the weights exactly
            assert_equal_state(snapshot(ema.ema_model), snapshot(model))
        if reference.ema is not None:
            assert_close_to(ema.ema_model.state_dict(), reference.ema)
    assert returned == [s >= first and s % every == 0 for s in range(1, 17)]


def test_no_ema_weights_before_the_start():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="10ba", ema_start="3ba")
    for batch in make_batches(2):
        train_step(model, optimizer, batch)
        assert ema.update(model) is False
    before = snapshot(model)
    with pytest.raises(RuntimeError), ema.ema_weights(model):
        pass
    assert_equal_state(snapshot(model), before)


def test_smoothing_given_directly_updates_every_batch():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(smoothing=0.8)
    assert ema.smoothing == 0.8
    reference = ClosedForm(0.8)
    for batch in make_batches(12):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        assert ema.update(model) is True
        assert_close_to(ema.ema_model.state_dict(), reference.ema)


def test_train_with_ema_weights_sets_the_training_weights_to_the_ema_after_each_update():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="4ba", update_interval="2ba", train_with_ema_weights=True)
    reference = ClosedForm(2 ** (-2 / 4))
    for step, batch in enumerate(make_batches(12), start=1):
        train_step(model, optimizer, batch)
        before_update = snapshot(model)
        if step % 2 == 0:
            reference.update(weights64(model))
        ema.update(model)
        if step % 2 == 0:
            assert_close_to(snapshot(model), reference.ema)
            assert_equal_state(snapshot(model), ema.ema_model.state_dict())
        else:
            assert_equal_state(snapshot(model), before_update)


# ------------------------------------------------------------ swapping in and out
def test_ema_weights_restores_training_weights_bit_for_bit_on_exit():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    reference = ClosedForm(2 ** (-1 / 3))
    train_and_average(model, optimizer, ema, reference, make_batches(6))
    training = snapshot(model)
    with ema.ema_weights(model) as inside:
        assert inside is model
        assert_close_to(snapshot(model), reference.ema)
        assert not torch.equal(model.module[0].weight, training["module.0.weight"])
    assert_equal_state(snapshot(model), training)
    # and the average carries on correctly after the round trip
    train_and_average(model, optimizer, ema, reference, make_batches(3, seed=2))
    assert_close_to(ema.ema_model.state_dict(), reference.ema)


def test_ema_weights_restores_training_weights_bit_for_bit_when_the_block_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    for batch in make_batches(5):
        train_step(model, optimizer, batch)
        ema.update(model)
    training = snapshot(model)
    ema_before = snapshot(ema.ema_model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), ema.ema_weights(model):
        model(make_batches(1)[0])
        raise Boom
    assert_equal_state(snapshot(model), training)
    assert_equal_state(snapshot(ema.ema_model), ema_before)
    # usable again: the EMA is not left swapped in
    assert ema.update(model) is True


def test_get_ema_model_and_get_training_model_swap_the_same_module():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    for batch in make_batches(5):
        train_step(model, optimizer, batch)
        ema.update(model)
    training = snapshot(model)
    average = snapshot(ema.ema_model)
    assert ema.get_ema_model(model) is model
    assert_equal_state(snapshot(model), average)
    assert ema.get_training_model(model) is model
    assert_equal_state(snapshot(model), training)


def test_ema_model_is_a_module_of_the_models_type_that_evaluates_the_average():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    for batch in make_batches(5):
        train_step(model, optimizer, batch)
        ema.update(model)
    ema_model = ema.ema_model
    assert type(ema_model) is Classifier
    assert ema_model is not model
    batch = make_batches(1, seed=9)[0]
    with torch.no_grad(), ema.ema_weights(model):
        expected = model(batch)
    with torch.no_grad():
        assert torch.equal(ema_model(batch), expected)


def test_ema_model_holds_the_ema_weights_also_while_they_are_swapped_into_the_model():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    for batch in make_batches(5):
        train_step(model, optimizer, batch)
        ema.update(model)
    average = snapshot(ema.ema_model)
    assert not torch.equal(average["module.0.weight"], model.module[0].weight)
    with ema.ema_weights(model):
        assert_equal_state(snapshot(ema.ema_model), average)
    assert_equal_state(snapshot(ema.ema_model), average)


# -------------------------------------------------------------- buffers, optimizer
def test_integer_buffers_are_copied_and_float_buffers_averaged():
    model = make_model(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="2ba")
    reference = ClosedForm(2 ** (-1 / 2))
    for step, batch in enumerate(make_batches(7), start=1):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        ema.update(model)
        state = ema.ema_model.state_dict()
        counter = state["module.1.num_batches_tracked"]
        assert counter.dtype == torch.int64
        assert counter.item() == step == model.module[1].num_batches_tracked.item()
        assert_close_to(state, reference.ema)
        assert "module.1.running_mean" in reference.ema


def test_an_optimizer_built_before_the_first_update_keeps_training_the_model():
    model = make_model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    ema = EMA(half_life="5ba")
    for batch in make_batches(8):
        before = snapshot(model)
        train_step(model, optimizer, batch)
        train_step(twin, twin_optimizer, batch)
        ema.update(model)
        assert not torch.equal(model.module[0].weight, before["module.0.weight"])
        # the EMA does not change training: same weights as a twin trained without it
        assert_equal_state(snapshot(model), snapshot(twin))
    assert [p for group in optimizer.param_groups for p in group["params"]] == params
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


# ------------------------------------------------------------------- state dict
@pytest.mark.parametrize("first_use", ["ema_weights", "update"])
@pytest.mark.parametrize("through_file", [False, True])
def test_a_fresh_ema_loading_a_state_dict_continues_exactly(through_file, first_use):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hyper = {"half_life": "6ba", "update_interval": "2ba", "ema_start": "3ba"}
    ema = EMA(**hyper)
    batches = make_batches(15)
    for batch in batches[:7]:  # stop between two updates: the batch count matters
        train_step(model, optimizer, batch)
        ema.update(model)

    state = ema.state_dict()
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    copy_model = make_model(seed=5)
    copy_model.load_state_dict(model.state_dict())
    copy_optimizer = torch.optim.SGD(copy_model.parameters(), lr=0.1, momentum=0.9)
    copy_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no shared momentum buffers
    fresh = EMA(**hyper)
    fresh.load_state_dict(state)

    if first_use == "ema_weights":  # the fresh EMA has not seen a model yet
        assert_equal_state(ema_state(fresh, copy_model), ema_state(ema, model))
    for batch in batches[7:]:  # both continue, in lockstep
        train_step(model, optimizer, batch)
        train_step(copy_model, copy_optimizer, batch)
        assert ema.update(model) == fresh.update(copy_model)
        assert_equal_state(snapshot(copy_model), snapshot(model))
        assert_equal_state(snapshot(fresh.ema_model), snapshot(ema.ema_model))


def test_a_fresh_ema_loading_the_state_of_an_ema_not_started_yet_starts_on_time():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hyper = {"half_life": "4ba", "ema_start": "4ba"}
    ema = EMA(**hyper)
    batches = make_batches(8)
    for batch in batches[:2]:
        train_step(model, optimizer, batch)
        assert ema.update(model) is False
    fresh = EMA(**hyper)
    fresh.load_state_dict(ema.state_dict())
    reference = ClosedForm(2 ** (-1 / 4))
    for step, batch in enumerate(batches[2:], start=3):
        train_step(model, optimizer, batch)
        if step >= 4:
            reference.update(weights64(model))
        assert fresh.update(model) is (step >= 4)
        if reference.ema is not None:
            assert_close_to(fresh.ema_model.state_dict(), reference.ema)


# ----------------------------------------------------------- re-pointed tensors
def test_updates_average_the_new_tensors_after_model_to_float64():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="4ba")
    reference = ClosedForm(2 ** (-1 / 4))
    train_and_average(model, optimizer, ema, reference, make_batches(5))
    model.to(torch.float64)
    for batch in make_batches(5, seed=2, dtype=torch.float64):
        train_step(model, optimizer, batch)  # the optimizer holds the same Parameter objects
        reference.update(weights64(model))
        ema.update(model)
        assert_close_to(ema.ema_model.state_dict(), reference.ema)
    assert model.module[0].weight.dtype == torch.float64
    training = snapshot(model)
    with ema.ema_weights(model):
        assert_close_to(snapshot(model), reference.ema)
    assert_equal_state(snapshot(model), training)


def test_updates_average_the_new_tensors_after_load_state_dict_with_assign():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="4ba")
    reference = ClosedForm(2 ** (-1 / 4))
    train_and_average(model, optimizer, ema, reference, make_batches(4))
    other = make_model(seed=3).state_dict()
    model.load_state_dict(other, assign=True)
    assert model.module[0].weight.data_ptr() == other["module.0.weight"].data_ptr()
    reference.update(weights64(model))
    ema.update(model)
    assert_close_to(ema.ema_model.state_dict(), reference.ema)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in make_batches(4, seed=2):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        ema.update(model)
        assert_close_to(ema.ema_model.state_dict(), reference.ema)


def test_updates_average_a_replaced_parameter():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="4ba")
    reference = ClosedForm(2 ** (-1 / 4))
    train_and_average(model, optimizer, ema, reference, make_batches(4))
    model.module[2].weight = nn.Parameter(torch.full((3, 8), 0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in make_batches(4, seed=2):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        ema.update(model)
        assert_close_to(ema.ema_model.state_dict(), reference.ema)
    training = snapshot(model)
    with ema.ema_weights(model):
        assert_close_to(snapshot(model), reference.ema)
    assert_equal_state(snapshot(model), training)


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_tied_weights_are_averaged_once_and_stay_tied():
    torch.manual_seed(0)
    model = Classifier(TiedNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(half_life="3ba")
    reference = ClosedForm(2 ** (-1 / 3))
    for batch in make_batches(8):
        train_step(model, optimizer, batch)
        assert model.module.first.weight is model.module.second.weight
        reference.update(weights64(model))
        ema.update(model)
        assert_close_to(ema.ema_model.state_dict(), reference.ema)
    ema_net = ema.ema_model.module
    assert ema_net.first.weight is ema_net.second.weight
    training = snapshot(model)
    with ema.ema_weights(model):
        assert model.module.first.weight is model.module.second.weight
        assert_close_to(snapshot(model), reference.ema)
    assert_equal_state(snapshot(model), training)


# ---------------------------------------------------------------- low precision
def _bounded_bf16_model() -> Classifier:
    """A bf16 model whose weights all lie in +-[0.5, 1]: far from zero, where bf16 steps are coarse."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.sign(torch.randn_like(p)) * (0.5 + 0.5 * torch.rand_like(p)))
    return model.to(torch.bfloat16)


def test_a_bf16_model_gets_an_fp32_ema_that_moves_where_a_bf16_ema_stays_stuck():
    model = _bounded_bf16_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fp32_ema = EMA(smoothing=0.9999)
    bf16_ema = EMA(smoothing=0.9999, ema_dtype="same")
    reference = ClosedForm(0.9999)
    start = None
    for batch in make_batches(10, dtype=torch.bfloat16):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        fp32_ema.update(model)
        bf16_ema.update(model)
        if start is None:
            start = snapshot(model)
    fp32_state = snapshot(fp32_ema.ema_model)
    bf16_state = snapshot(bf16_ema.ema_model)
    assert {t.dtype for t in fp32_state.values()} == {torch.float32}
    assert {t.dtype for t in bf16_state.values()} == {torch.bfloat16}
    assert_close_to(fp32_state, reference.ema)
    for name, first in start.items():
        assert not torch.equal(snapshot(model)[name], first), "training must move the weights"
        assert not torch.equal(fp32_state[name], first.float()), name  # the fp32 EMA moved
        assert torch.equal(bf16_state[name], first), name  # every bf16 update rounded away
    training = snapshot(model)
    with fp32_ema.ema_weights(model):
        assert model.module[0].weight.dtype == torch.bfloat16
        assert torch.equal(model.module[0].weight, fp32_state["module.0.weight"].to(torch.bfloat16))
    assert_equal_state(snapshot(model), training)


def test_channels_last_weights_keep_their_memory_format_and_the_forward_is_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = Classifier(net).to(memory_format=torch.channels_last)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(8, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last),
        torch.randint(0, 3, (8,), generator=gen),
    )
    with torch.no_grad():
        before = model(batch)
    ema = EMA(half_life="4ba")
    ema.update(model)  # the EMA attaches to the model here
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(model(batch), before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = ClosedForm(2 ** (-1 / 4))
    reference.update(weights64(model))
    for _ in range(4):
        train_step(model, optimizer, batch)
        reference.update(weights64(model))
        ema.update(model)
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_to(ema.ema_model.state_dict(), reference.ema)
    with ema.ema_weights(model):
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert_close_to(snapshot(model), reference.ema)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_ema_model_outlives_the_trainer_and_the_training_model() -> None:
    import gc

    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Classifier, Trainer

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))

    def train() -> EMA:
        ema = EMA(half_life="10ba")
        Trainer(
            Classifier(nn.Linear(4, 3)), DataLoader(data, batch_size=8), "1ep", algorithms=[ema], progress_bar=False
        ).fit()
        return ema

    ema = train()
    gc.collect()
    assert isinstance(ema.ema_model, Classifier)
    assert torch.equal(ema.ema_model.module.weight, ema.state_dict()["weights"]["module.weight"])


# ------------------------------------------------------------------ several EMAs on one model
def two_trained_averages(batchnorm: bool = True) -> tuple[nn.Module, list[EMA], list[ClosedForm]]:
    """A model trained 5 steps with a default-mode and a flatten_model EMA beside their float64 closed forms."""
    model = make_model(batchnorm=batchnorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    emas = [EMA(smoothing=0.5), EMA(smoothing=0.8, flatten_model=True)]
    references = [ClosedForm(0.5), ClosedForm(0.8)]
    for batch in make_batches(5):
        train_step(model, optimizer, batch)
        for ema, reference in zip(emas, references):
            reference.update(weights64(model))
            ema.update(model)
    return model, emas, references


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["default-then-flatten", "flatten-then-default"])
def test_swaps_of_two_emas_nest_in_either_order(order):
    model, emas, references = two_trained_averages()
    training = snapshot(model)
    outer, inner = order
    with emas[outer].ema_weights(model):
        assert_close_to(weights64(model), references[outer].ema)
        with emas[inner].ema_weights(model):
            assert_close_to(weights64(model), references[inner].ema)
        assert_close_to(weights64(model), references[outer].ema)
    assert_equal_state(snapshot(model), training)
    for ema, reference in zip(emas, references):
        assert_close_to(weights64(ema.ema_model), reference.ema)


def test_training_weights_takes_this_emas_averages_out_for_the_block_and_puts_them_back():
    model, (outer, inner), references = two_trained_averages()
    training = snapshot(model)
    with outer.ema_weights(model), inner.ema_weights(model):
        with inner.training_weights(model) as inside:  # only this EMA's average comes out
            assert inside is model
            assert_close_to(weights64(model), references[0].ema)
        with inner.training_weights(model), outer.training_weights(model):  # the innermost out first
            assert_equal_state(snapshot(model), training)
        assert_close_to(weights64(model), references[1].ema)  # both back in, the inner one on top
    assert_equal_state(snapshot(model), training)
    with outer.training_weights(model):  # nothing swapped in: nothing to take out
        assert_equal_state(snapshot(model), training)


def test_a_swap_out_in_the_wrong_order_raises_and_corrupts_nothing():
    model, (first, second), references = two_trained_averages()
    training = snapshot(model)
    first.get_ema_model(model)
    second.get_ema_model(model)
    with pytest.raises(RuntimeError, match="reverse order"):
        first.get_training_model(model)
    assert_close_to(weights64(model), references[1].ema)  # still the inner average
    second.get_training_model(model)
    first.get_training_model(model)
    assert_equal_state(snapshot(model), training)
    for ema, reference in zip((first, second), references):
        assert_close_to(weights64(ema.ema_model), reference.ema)


def test_an_ema_refuses_to_update_while_another_is_swapped_into_the_model():
    model, (first, second), _ = two_trained_averages()
    with first.ema_weights(model), pytest.raises(RuntimeError, match="swapped into the model"):
        second.update(model)  # would average the first EMA's weights as if they were the training weights


def test_a_second_flatten_model_ema_on_the_same_model_is_refused():
    model, _, _ = two_trained_averages()
    with pytest.raises(ValueError, match="already bound by another EMA with flatten_model=True"):
        EMA(smoothing=0.5, flatten_model=True).update(model)


def test_a_compiled_model_evaluates_the_average_inside_ema_weights():
    """Default inductor backend: the compiled graph reads the model's tensors, which hold the average inside."""
    model = make_model(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model)
    ema = EMA(smoothing=0.5)
    batches = make_batches(4)
    for batch in batches[:3]:
        optimizer.zero_grad()
        model.loss(compiled(batch), batch).backward()
        optimizer.step()
        ema.update(compiled)
    model.eval()
    plain = copy.deepcopy(model)
    plain.load_state_dict(ema.ema_model.state_dict())
    with torch.no_grad():
        training_out = compiled(batches[3]).clone()
        with ema.ema_weights(compiled):
            averaged_out = compiled(batches[3]).clone()
        after = compiled(batches[3])
    torch.testing.assert_close(averaged_out, plain(batches[3]), rtol=1e-5, atol=1e-6)
    assert torch.equal(after, training_out)
    assert not torch.allclose(averaged_out, training_out)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["default-then-flatten", "flatten-then-default"])
def test_a_write_under_the_outer_swap_is_found_after_a_nested_swap(order):
    model, emas, _ = two_trained_averages(batchnorm=False)
    training = snapshot(model)
    outer, inner = (emas[i] for i in order)
    outer.get_ema_model(model)
    with torch.no_grad():
        model.module[0].bias.add_(1.0)  # an in-place write while the outer average is in the model
    with inner.ema_weights(model):
        pass
    with pytest.raises(RuntimeError, match=r"module\.0\.bias"):
        outer.get_training_model(model)
    assert_equal_state(snapshot(model), training)


@pytest.mark.parametrize(
    ("saved", "loading", "fragment"),
    [
        ({"half_life": "10ba"}, {"half_life": "20ba"}, "half_lives ['10ba'] saved, ['20ba'] here"),
        ({"smoothing": 0.9}, {"smoothing": 0.99}, "smoothings [0.9] saved, [0.99] here"),
        ({"half_life": "10ba"}, {"half_life": "10ba", "update_interval": "2ba"}, "update_interval '1ba' saved"),
        ({"half_life": "10ba"}, {"half_life": "10ba", "warmup": "tf"}, "warmup None saved, 'tf' here"),
        ({"smoothing": 0.9, "warmup": "tf"}, {"smoothing": 0.9, "warmup": "tf", "min_smoothing": 0.5}, "min_smoothing"),
    ],
)
def test_a_state_saved_with_other_rates_is_refused_by_name(saved, loading, fragment):
    model = make_model()
    source = EMA(**saved)
    for batch in make_batches(2):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch)
        source.update(model)
    target = EMA(**loading)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        target.load_state_dict(source.state_dict())
    assert not target.started


def test_strict_false_continues_a_state_at_the_new_rate_with_a_warning():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    source, reference = EMA(smoothing=0.9), ClosedForm(0.9)
    batches = make_batches(6)
    for batch in batches[:3]:
        train_step(model, optimizer, batch)
        source.update(model)
        reference.update(weights64(model))
    target = EMA(smoothing=0.5)
    with pytest.warns(UserWarning, match=re.escape("smoothings [0.9] saved, [0.5] here")):
        target.load_state_dict(source.state_dict(), strict=False)
    reference.smoothing = 0.5
    for batch in batches[3:]:
        train_step(model, optimizer, batch)
        target.update(model)
        reference.update(weights64(model))
    assert_close_to(ema_state(target, model), reference.ema)


def test_ema_state_dict_is_a_detached_copy_keyed_like_the_models_state_dict():
    model = make_model(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema, reference = EMA(half_life=("2ba", "4ba")), [ClosedForm(2**-0.5), ClosedForm(2**-0.25)]
    for batch in make_batches(4):
        train_step(model, optimizer, batch)
        ema.update(model)
        for closed in reference:
            closed.update(weights64(model))
    for index, closed in enumerate(reference):
        exported = ema.ema_state_dict(index)
        assert list(exported) == list(model.state_dict())
        assert_close_to({k: v for k, v in exported.items() if v.is_floating_point()}, closed.ema)
        before = {k: v.clone() for k, v in ema.ema_state_dict(index).items()}
        for value in exported.values():
            value.zero_()  # the copy is the caller's
        assert_equal_state(ema.ema_state_dict(index), before)
        plain = make_model(batchnorm=True)
        plain.load_state_dict(exported)
