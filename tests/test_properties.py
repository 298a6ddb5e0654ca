"""Property-based tests (hypothesis) of the EMA math and of time strings.

Models here are one small parameter tensor (``Holder``) whose values the test sets before each
update, so any sequence of weights can be averaged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emakit import EMA, Time, TimeUnit
from emakit.functional import compute_ema

SETTINGS = settings(max_examples=60, deadline=None)
SIZE = 5


class Holder(nn.Module):
    """One parameter of ``SIZE`` values, and a float buffer that follows it (averaged like a parameter)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(SIZE, dtype=dtype))
        self.register_buffer("shadow", torch.zeros(SIZE, dtype=dtype))

    @torch.no_grad()
    def set(self, values: list[float] | torch.Tensor) -> None:
        values = torch.as_tensor(values, dtype=torch.float64)
        self.weight.copy_(values)
        self.shadow.copy_(-values)


def average(ema: EMA) -> torch.Tensor:
    return ema.ema_model.weight.detach().to(torch.float64)


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=SIZE, max_size=SIZE)
smoothings = st.floats(min_value=1e-6, max_value=1 - 1e-6)


# ------------------------------------------------------------------------------ EMA math
@SETTINGS
@given(
    values=vectors,
    smoothing=smoothings,
    updates=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_constant_parameters_stay_constant_under_any_smoothing(values, smoothing, updates, dtype):
    model = Holder(dtype)
    model.set(values)
    expected = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ema = EMA(smoothing=smoothing)
    for _ in range(updates):
        ema.update(model)
    for name, tensor in ema.ema_model.state_dict().items():
        assert torch.equal(tensor.to(torch.float64), expected[name].to(torch.float64)), name


@SETTINGS
@given(history=st.lists(vectors, min_size=1, max_size=10), smoothing=smoothings)
def test_the_ema_stays_inside_the_range_of_the_weights_it_averaged(history, smoothing):
    model = Holder()
    ema = EMA(smoothing=smoothing)
    seen = []
    for values in history:
        model.set(values)
        ema.update(model)
        seen.append(model.weight.detach().to(torch.float64).clone())
        stacked = torch.stack(seen)
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        slack = 4 * torch.finfo(torch.float32).eps * torch.maximum(low.abs(), high.abs())
        now = average(ema)
        assert (now >= low - slack).all() and (now <= high + slack).all(), (now, low, high)


@SETTINGS
@given(
    a=finite,
    b=finite,
    half_life=st.integers(1, 60),
    interval=st.integers(1, 5),
    jumps_after=st.integers(0, 10),
)
def test_interval_and_half_life_agree_with_the_closed_form_after_one_jump(a, b, half_life, interval, jumps_after):
    """The average starts at ``a`` (the first update event); the weights then jump to ``b`` for ``k`` more events.

    Then ``ema = b + (a - b) * 2 ** (-(k * interval) / half_life)``; between events it does not move.
    """
    model = Holder()
    ema = EMA(half_life=f"{half_life}ba", update_interval=f"{interval}ba")
    model.set([a] * SIZE)
    for batch in range(1, interval + 1):
        assert ema.update(model) is (batch == interval)
    model.set([b] * SIZE)
    for k in range(1, jumps_after + 1):
        for batch in range(1, interval + 1):
            before = average(ema)
            assert ema.update(model) is (batch == interval)
            if batch != interval:
                assert torch.equal(average(ema), before)
        expected = b + (a - b) * 2.0 ** (-(k * interval) / half_life)
        tolerance = 1e-5 * max(1.0, abs(a), abs(b))
        assert average(ema) == pytest.approx(torch.full((SIZE,), expected, dtype=torch.float64), abs=tolerance)
    assert ema.num_updates == jumps_after + 1


@SETTINGS
@given(
    history=st.lists(vectors, min_size=1, max_size=8),
    smoothing=st.floats(0.0, 1.0),
    flatten=st.booleans(),
)
def test_ema_and_compute_ema_follow_the_float64_recurrence(history, smoothing, flatten):
    """Both forms against one independent reference: the recurrence computed in float64 from the same weights."""
    smoothing = min(max(smoothing, 1e-6), 1 - 1e-6)  # EMA takes (0, 1); compute_ema also the ends
    model = Holder()
    ema = EMA(smoothing=smoothing, flatten_model=flatten)
    ema_model: Holder | None = None
    reference: torch.Tensor | None = None
    for values in history:
        model.set(values)
        weights = model.weight.detach().to(torch.float64).clone()  # what the float32 model holds
        reference = weights if reference is None else smoothing * reference + (1 - smoothing) * weights
        ema.update(model)
        if ema_model is None:
            ema_model = copy.deepcopy(model)  # the average starts at the weights
        else:
            compute_ema(model, ema_model, smoothing=smoothing)
    scale = max(1.0, max(abs(v) for values in history for v in values))
    for got in (ema.ema_model, ema_model):
        torch.testing.assert_close(got.weight.detach().double(), reference, rtol=0, atol=4e-7 * scale)
        torch.testing.assert_close(got.shadow.double(), -reference, rtol=0, atol=4e-7 * scale)


# ---------------------------------------------------------------------------- time strings
WHOLE_UNITS = [TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE, TimeUnit.TOKEN]
whole_times = st.builds(Time, st.integers(0, 10**15), st.sampled_from(WHOLE_UNITS))
durations = st.builds(Time, st.floats(0.0, 1.0), st.just(TimeUnit.DURATION))
times = st.one_of(whole_times, durations)


@settings(max_examples=200, deadline=None)
@given(time=times)
def test_str_of_a_time_parses_back_to_the_same_time(time):
    parsed = Time.from_timestring(str(time))
    assert parsed == time
    assert type(parsed.value) is type(time.value)
    assert str(parsed) == str(time)


@st.composite
def same_unit_pairs(draw):
    unit = draw(st.sampled_from(list(TimeUnit)))
    value = st.floats(0.0, 1.0) if unit is TimeUnit.DURATION else st.integers(0, 10**15)
    return Time(draw(value), unit), Time(draw(value), unit)


@settings(max_examples=200, deadline=None)
@given(pair=same_unit_pairs())
def test_comparisons_of_times_agree_with_their_values_also_after_a_round_trip(pair):
    a, b = pair
    for x, y in ((a, b), (Time.from_timestring(str(a)), Time.from_timestring(str(b)))):
        assert (x < y) is (a.value < b.value)
        assert (x <= y) is (a.value <= b.value)
        assert (x > y) is (a.value > b.value)
        assert (x >= y) is (a.value >= b.value)
        assert (x == y) is (a.value == b.value)
        assert (hash(x) == hash(y)) or x != y


@settings(max_examples=200, deadline=None)
@given(pair=same_unit_pairs())
def test_adding_times_of_one_unit_adds_their_values(pair):
    a, b = pair
    if a.unit is TimeUnit.DURATION and a.value + b.value > 1:
        with pytest.raises(ValueError, match="dur"):
            a + b
        return
    total = a + b
    assert total.unit is a.unit
    assert total.value == a.value + b.value
    assert a <= total and b <= total


@settings(max_examples=100, deadline=None)
@given(a=times, b=times)
def test_times_of_different_units_are_unequal_and_do_not_compare(a, b):
    if a.unit is b.unit:
        return
    assert a != b
    for operation in (lambda: a < b, lambda: a <= b, lambda: a + b):
        with pytest.raises(ValueError, match="units differ"):
            operation()


@settings(max_examples=100, deadline=None)
@given(value=st.integers(0, 10**15), unit=st.sampled_from(WHOLE_UNITS))
def test_whole_times_parse_from_their_exponent_forms(value, unit):
    mantissa, exponent = value, 0
    while mantissa and mantissa % 10 == 0:
        mantissa, exponent = mantissa // 10, exponent + 1
    parsed = Time.from_timestring(f"{mantissa}e{exponent}{unit.value}")
    assert parsed == Time(value, unit)
    assert type(parsed.value) is int
