"""emakit.functional: compute_ema against the closed form, and smoothing_from_half_life."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from emakit.functional import compute_ema, smoothing_from_half_life

# fp32 lerp against a float64 closed form: a few ulps of the operands.
TOL = {"rtol": 1.3e-6, "atol": 1e-6}


class Net(nn.Module):
    """Linear layers and a BatchNorm: float parameters, float buffers and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


def make_pair(seed: int = 0) -> tuple[Net, Net]:
    """A model and an ema_model of the same structure whose every tensor differs."""
    torch.manual_seed(seed)
    model = Net()
    ema_model = copy.deepcopy(model)
    perturb(model)
    return model, ema_model


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Move every float tensor of ``model`` (as an optimizer step and a train-mode forward would)."""
    for tensor in model.parameters():
        tensor.add_(torch.randn_like(tensor))
    model.train()
    dtype = next(model.parameters()).dtype
    model((torch.randn(8, 4) * 3 + 1).to(dtype))  # running stats move, num_batches_tracked counts


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def as64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().to(torch.float64) if t.is_floating_point() else t.detach().clone()
        for name, t in model.state_dict().items()
    }


def closed_form(
    ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], smoothing: float
) -> dict[str, torch.Tensor]:
    """``ema = s * ema + (1 - s) * param`` in float64 for floating tensors; integer tensors copied."""
    return {
        name: smoothing * ema[name] + (1 - smoothing) * params[name]
        if ema[name].is_floating_point()
        else params[name].clone()
        for name in ema
    }


def assert_matches(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        if got.is_floating_point():
            torch.testing.assert_close(got, want.to(got.dtype), **TOL, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert got.dtype == want.dtype, name
            assert torch.equal(got, want), name


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name


# ------------------------------------------------------------------ closed form


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_one_update_matches_closed_form(smoothing: float) -> None:
    model, ema_model = make_pair()
    expected = closed_form(as64(ema_model), as64(model), smoothing)
    compute_ema(model, ema_model, smoothing=smoothing)
    assert_matches(ema_model, expected)


def test_default_smoothing_is_0_99() -> None:
    model, ema_model = make_pair()
    expected = closed_form(as64(ema_model), as64(model), 0.99)
    compute_ema(model, ema_model)
    assert_matches(ema_model, expected)


@pytest.mark.parametrize("smoothing", [0, 0.0])
def test_smoothing_zero_copies_the_model_exactly(smoothing: float) -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=smoothing)
    assert_unchanged(ema_model, snapshot(model))


@pytest.mark.parametrize("smoothing", [1, 1.0])
def test_smoothing_one_leaves_floating_tensors_unchanged_exactly(smoothing: float) -> None:
    model, ema_model = make_pair()
    before = snapshot(ema_model)
    compute_ema(model, ema_model, smoothing=smoothing)
    after = ema_model.state_dict()
    for name, tensor in before.items():
        if tensor.is_floating_point():
            assert torch.equal(after[name], tensor), name
    # integer buffers are copied whatever the smoothing
    assert torch.equal(after["bn.num_batches_tracked"], model.bn.num_batches_tracked)


def test_model_is_not_modified() -> None:
    model, ema_model = make_pair()
    before = snapshot(model)
    compute_ema(model, ema_model, smoothing=0.7)
    assert_unchanged(model, before)


def test_ema_tensors_stay_leaves_without_history() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.7)
    for param in ema_model.parameters():
        assert param.grad_fn is None
        assert param.requires_grad


@pytest.mark.parametrize("smoothing", [0.0, 0.6, 0.95])
def test_repeated_updates_over_a_training_sequence_match_closed_form(smoothing: float) -> None:
    model, ema_model = make_pair(seed=1)
    expected = as64(ema_model)
    for _ in range(12):
        perturb(model)
        expected = closed_form(expected, as64(model), smoothing)
        compute_ema(model, ema_model, smoothing=smoothing)
        assert_matches(ema_model, expected)


def test_smoothing_may_change_between_calls() -> None:
    model, ema_model = make_pair(seed=2)
    expected = as64(ema_model)
    for smoothing in (0.9, 0.5, 0.99, 0.0, 1.0):
        perturb(model)
        expected = closed_form(expected, as64(model), smoothing)
        compute_ema(model, ema_model, smoothing=smoothing)
        assert_matches(ema_model, expected)


# ------------------------------------------------------------------ buffers


def test_floating_buffers_are_averaged_and_integer_buffers_copied() -> None:
    model, ema_model = make_pair()
    for _ in range(4):
        perturb(model)
    assert int(model.bn.num_batches_tracked) == 5
    assert int(ema_model.bn.num_batches_tracked) == 0
    mean, var = ema_model.bn.running_mean.double(), ema_model.bn.running_var.double()
    compute_ema(model, ema_model, smoothing=0.75)
    torch.testing.assert_close(
        ema_model.bn.running_mean, (0.75 * mean + 0.25 * model.bn.running_mean.double()).float(), **TOL
    )
    torch.testing.assert_close(
        ema_model.bn.running_var, (0.75 * var + 0.25 * model.bn.running_var.double()).float(), **TOL
    )
    assert ema_model.bn.num_batches_tracked.dtype == torch.int64
    assert int(ema_model.bn.num_batches_tracked) == 5  # copied, not 0.75 * 0 + 0.25 * 5


def test_integer_buffers_follow_the_model_on_every_call() -> None:
    model, ema_model = make_pair()
    for step in range(3):
        perturb(model)
        compute_ema(model, ema_model, smoothing=0.9)
        assert torch.equal(ema_model.bn.num_batches_tracked, model.bn.num_batches_tracked), step


# ------------------------------------------------------------------ tied weights


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_are_averaged_once_and_stay_tied() -> None:
    torch.manual_seed(3)
    model = Tied()
    ema_model = copy.deepcopy(model)
    assert ema_model.out.weight is ema_model.embed.weight
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert ema_model.out.weight is ema_model.embed.weight
    # averaged once: 0.5 * ema + 0.5 * param, not 0.25 * ema + 0.75 * param
    assert_matches(ema_model, expected)


# ------------------------------------------------------------------ the cache notices replaced tensors


def test_replaced_submodule_after_first_call_is_used() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    torch.manual_seed(10)
    model.fc = nn.Linear(4, 6)  # same shape, new tensors
    perturb(model)
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert_matches(ema_model, expected)


def test_replaced_parameter_after_first_call_is_used() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    model.head.weight = nn.Parameter(torch.randn(3, 6) * 5)
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert_matches(ema_model, expected)


def test_load_state_dict_assign_after_first_call_is_used() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    torch.manual_seed(11)
    new_state = {
        name: (torch.randn_like(t) * 4 if t.is_floating_point() else t + 3) for name, t in model.state_dict().items()
    }
    model.load_state_dict(new_state, assign=True)
    assert model.fc.weight.data_ptr() == new_state["fc.weight"].data_ptr()
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert_matches(ema_model, expected)


def test_replaced_ema_submodule_after_first_call_is_updated() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    torch.manual_seed(12)
    ema_model.head = nn.Linear(6, 3)
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert_matches(ema_model, expected)


def test_another_model_after_first_call_is_used() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    other, _ = make_pair(seed=5)
    expected = closed_form(as64(ema_model), as64(other), 0.5)
    compute_ema(other, ema_model, smoothing=0.5)
    assert_matches(ema_model, expected)


def test_model_converted_to_float64_after_first_call() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    model.to(torch.float64)
    with torch.no_grad():
        model.fc.weight.add_(1e-3)  # a change only float64 can hold exactly
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert ema_model.fc.weight.dtype == torch.float32
    assert_matches(ema_model, expected)


def test_ema_model_converted_to_float64_after_first_call() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    ema_model.to(torch.float64)
    perturb(model)
    expected = closed_form(as64(ema_model), as64(model), 0.5)
    compute_ema(model, ema_model, smoothing=0.5)
    assert ema_model.fc.weight.dtype == torch.float64
    for name, want in expected.items():
        got = ema_model.state_dict()[name]
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ mixed dtypes


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fp32_ema_of_a_lower_or_higher_precision_model(model_dtype: torch.dtype) -> None:
    model, ema_model = make_pair()
    model.to(model_dtype)
    expected = as64(ema_model)
    for smoothing in (0.9, 0.99):
        perturb(model)
        expected = closed_form(expected, as64(model), smoothing)
        compute_ema(model, ema_model, smoothing=smoothing)
        assert ema_model.fc.weight.dtype == torch.float32
        assert_matches(ema_model, expected)


def test_mixed_dtype_smoothing_zero_copies_the_cast_model() -> None:
    model, ema_model = make_pair()
    model.to(torch.bfloat16)
    compute_ema(model, ema_model, smoothing=0.0)
    for name, tensor in model.state_dict().items():
        got = ema_model.state_dict()[name]
        assert torch.equal(got, tensor.to(got.dtype)), name


# ------------------------------------------------------------------ structural mismatch


def test_missing_tensor_raises_naming_it_and_leaves_ema_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ema_model = nn.Sequential(nn.Linear(3, 3))
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape("'1.weight'")):
        compute_ema(model, ema_model, smoothing=0.5)
    assert_unchanged(ema_model, before)


def test_extra_tensor_in_ema_model_raises_naming_it_and_leaves_ema_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    ema_model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape("'1.weight'")):
        compute_ema(model, ema_model, smoothing=0.5)
    assert_unchanged(ema_model, before)


def test_missing_bias_raises_naming_it() -> None:
    model = nn.Linear(3, 3)
    ema_model = nn.Linear(3, 3, bias=False)
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape("'bias'")):
        compute_ema(model, ema_model, smoothing=0.5)
    assert_unchanged(ema_model, before)


def test_other_shape_raises_naming_the_first_differing_tensor() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 6))
    ema_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 7), nn.Linear(7, 6))
    before = snapshot(ema_model)
    with pytest.raises(ValueError) as error:
        compute_ema(model, ema_model, smoothing=0.5)
    message = str(error.value)
    assert "'1.weight'" in message
    assert "'1.bias'" not in message and "'2.weight'" not in message
    assert_unchanged(ema_model, before)


def test_structure_change_after_first_call_raises_and_leaves_ema_model_unchanged() -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)
    model.head = nn.Linear(6, 5)
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape("'head.weight'")):
        compute_ema(model, ema_model, smoothing=0.5)
    assert_unchanged(ema_model, before)


def test_shape_change_by_assigning_load_state_dict_after_first_call_raises() -> None:
    model = nn.Linear(3, 3)
    ema_model = copy.deepcopy(model)
    compute_ema(model, ema_model, smoothing=0.5)
    model.weight = nn.Parameter(torch.randn(3, 4))
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape("'weight'")):
        compute_ema(model, ema_model, smoothing=0.5)
    assert_unchanged(ema_model, before)


# ------------------------------------------------------------------ bad smoothing


@pytest.mark.parametrize(
    "smoothing",
    [-0.1, -1, 1.0000001, 1.5, 2, float("nan"), float("inf"), float("-inf"), True, False, "0.5", None],
    ids=repr,
)
def test_bad_smoothing_raises_naming_it_and_leaves_ema_model_unchanged(smoothing: object) -> None:
    model, ema_model = make_pair()
    compute_ema(model, ema_model, smoothing=0.5)  # a cached plan must not skip the check
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=re.escape(f"smoothing={smoothing!r}")):
        compute_ema(model, ema_model, smoothing=smoothing)  # type: ignore[arg-type]
    assert_unchanged(ema_model, before)


def test_bad_smoothing_is_rejected_before_the_first_call_too() -> None:
    model, ema_model = make_pair()
    before = snapshot(ema_model)
    with pytest.raises(ValueError, match=r"smoothing=1\.5"):
        compute_ema(model, ema_model, smoothing=1.5)
    assert_unchanged(ema_model, before)


# ------------------------------------------------------------------ smoothing_from_half_life


@pytest.mark.parametrize(
    ("half_life", "update_interval", "expected"),
    [
        (1, 1, 0.5),
        (2, 1, 2**-0.5),
        (100, 1, 2 ** (-1 / 100)),
        (100, 10, 2 ** (-10 / 100)),
        (10, 10, 0.5),
        (5, 10, 0.25),
        (0.5, 1, 0.25),
        (1000.0, 2.5, 2 ** (-2.5 / 1000)),
    ],
)
def test_smoothing_from_half_life_values(half_life: float, update_interval: float, expected: float) -> None:
    assert smoothing_from_half_life(half_life, update_interval) == pytest.approx(expected, rel=1e-15)


def test_smoothing_from_half_life_default_interval_is_one() -> None:
    assert smoothing_from_half_life(100) == smoothing_from_half_life(100, 1) == 2 ** (-1 / 100)


def test_weight_of_a_term_halves_after_one_half_life() -> None:
    smoothing = smoothing_from_half_life(50, 5)
    assert math.isclose(smoothing ** (50 / 5), 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), True, "10", None], ids=repr)
def test_smoothing_from_half_life_rejects_bad_half_life(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"half_life={bad!r}")):
        smoothing_from_half_life(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), False, "1", None], ids=repr)
def test_smoothing_from_half_life_rejects_bad_update_interval(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"update_interval={bad!r}")):
        smoothing_from_half_life(10, bad)  # type: ignore[arg-type]
