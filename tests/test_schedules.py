"""``EMA(schedule=...)``: the smoothing as a function of the optimizer step, against the float64 recurrence with
the schedule's values written out; the built-ins against their formulas (DINO's cosine, torchtitan's rule)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit import EMA, schedules


def test_builtin_schedules_are_their_formulas() -> None:
    cosine = schedules.cosine(start=0.996, end=1.0, steps=100)
    for t in (0, 1, 37, 50, 100, 250):
        expected = 1.0 - (1.0 - 0.996) * (1 + math.cos(math.pi * min(t, 100) / 100)) / 2
        assert cosine(t) == pytest.approx(expected, abs=1e-15)
    titan = schedules.growing_half_life()
    for t in (1, 20, 1000):
        assert titan(t) == pytest.approx(2 ** (-1 / (0.05 * t)), rel=1e-15)
    assert titan(20) == pytest.approx(0.5)  # at step 20 the half-life is 1 step
    spanning = schedules.cosine(0.9, 1.0)
    with pytest.raises(RuntimeError, match=r"the run's length is unknown: give cosine\(..., steps=N\)"):
        spanning(3)
    spanning.set_run_length(10)
    assert spanning(5) == pytest.approx(0.95)


def recurrence(history: list[dict[str, torch.Tensor]], smoothings: list[float]) -> dict[str, torch.Tensor]:
    """ema_1 = w_1; ema_t = s_t ema_(t-1) + (1 - s_t) w_t in float64, s_t given per step."""
    ema = {k: v.double() for k, v in history[0].items()}
    for weights, s in zip(history[1:], smoothings[1:]):
        ema = {k: s * ema[k] + (1 - s) * weights[k].double() for k in ema}
    return ema


def train(ema: EMA, steps: int, seed: int = 0) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    history = []
    for _ in range(steps):
        nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, history


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value, rtol=1e-6, atol=1e-7, msg=key)


def test_each_update_uses_the_schedule_at_its_step() -> None:
    ema = EMA(schedule=[schedules.cosine(0.5, 1.0, steps=8), lambda t: 0.3])
    assert ema.labels == ["ema@cosine(0.5->1)", "ema@<lambda>"]
    _, history = train(ema, 10)
    cosine = [0.5 + 0.5 * (1 - (1 + math.cos(math.pi * min(t, 8) / 8)) / 2) for t in range(1, 11)]
    assert_close(ema.ema_state_dict(0), recurrence(history, cosine))
    assert_close(ema.ema_state_dict("<lambda>"), recurrence(history, [0.3] * 10))
    assert ema.last_smoothing == pytest.approx(1.0)  # what the Trainer logs as ema/smoothing: step 10 is past 8
    assert ema.last_scheduled == (10, (1.0, 0.3))


def test_a_resumed_schedule_ends_bit_for_bit_and_another_is_refused() -> None:
    ema = EMA(schedule=schedules.growing_half_life(0.5))
    model, _ = train(ema, 4)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = EMA(schedule=schedules.growing_half_life(0.5))
    resumed.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        resumed.update(model)
    for key, value in ema.ema_state_dict().items():
        assert torch.equal(resumed.ema_state_dict()[key], value), key
    other = EMA(schedule=schedules.growing_half_life(0.1))
    with pytest.raises(ValueError, match=r"other rates .*schedules \['ema@half_life=0.5t'\] saved"):
        other.load_state_dict(state)
    same_label = EMA(schedule=lambda t: 0.9)
    same_label_state = {**state, "schedules": ["ema@<lambda>"]}
    with pytest.raises(ValueError, match=r"the schedule gave \[.*\] at step 4, gives \[0.9\] here"):
        same_label.load_state_dict(same_label_state)
    with pytest.warns(UserWarning, match="continuing a state saved with other rates"):
        same_label.load_state_dict(same_label_state, strict=False)


def test_the_trainer_gives_a_spanning_schedule_the_run_length() -> None:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    torch.manual_seed(0)
    model = emakit.Classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    cosine = schedules.cosine(0.5, 1.0)  # no steps: the run's 8
    ema = EMA(schedule=cosine)
    trainer = emakit.Trainer(
        model, DataLoader(data, batch_size=4), "8ba", optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[ema], progress_bar=False,
    )  # fmt: skip
    trainer.fit()
    assert cosine.steps == 8 and ema.num_updates == 8 and ema.last_scheduled == (8, (1.0,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": lambda t: 0.9, "smoothing": 0.9}, "pass one of schedule= and smoothing=0.9"),
        ({"schedule": lambda t: 0.9, "half_life": "10ba"}, "pass one of schedule= and half_life='10ba'"),
        ({"schedule": lambda t: 0.9, "warmup": "tf"}, "warmup='tf' and min_smoothing=0.0 do not apply"),
        ({"schedule": lambda t: 0.9, "update_interval": "1ep"}, "a schedule counts optimizer steps"),
        ({"schedule": 0.9}, "must be a callable step -> smoothing"),
    ],
)
def test_bad_schedules_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_a_schedule_leaving_zero_one_is_refused_at_its_step() -> None:
    ema = EMA(schedule=lambda t: 1.5 if t == 3 else 0.9)
    with pytest.raises(ValueError, match=r"gave smoothing 1.5 at step 3, not in \[0, 1\]"):
        train(ema, 3)
