"""EMA warmup: the smoothing ramps up over the first updates — against the formulas in float64 and the peers.

diffusers' ``EMAModel`` and torch_ema implement the same schedules; run on the same weights they
must give the same averages.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emakit import EMA
from emakit.functional import warmup_smoothing

SMOOTHING = 0.999


def weight_sequence(steps: int = 30, size: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=gen) * (1 + step) for step in range(steps)]


def expected_average(weights: list[torch.Tensor], smoothing_of) -> torch.Tensor:
    """The recurrence in float64: start at the first weights, then update ``n`` uses ``smoothing_of(n)``."""
    average = weights[0].double()
    for n, w in enumerate(weights[1:], start=1):
        s = smoothing_of(n)
        average = s * average + (1 - s) * w.double()
    return average


def run_emakit(weights: list[torch.Tensor], **kwargs) -> EMA:
    model = nn.Linear(6, 1, bias=False)
    ema = EMA(smoothing=SMOOTHING, **kwargs)
    for w in weights:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update(model)
    return ema


@pytest.mark.parametrize(
    ("warmup", "formula"),
    [
        ("tf", lambda n: min(SMOOTHING, (1 + n) / (10 + n))),
        (("power", 1, 2 / 3), lambda n: min(SMOOTHING, 1 - (1 + n) ** (-2 / 3))),
        (("power", 10, 0.75), lambda n: min(SMOOTHING, 1 - (1 + n / 10) ** -0.75)),
    ],
)
def test_the_average_follows_the_warmup_recurrence(warmup, formula):
    weights = weight_sequence()
    ema = run_emakit(weights, warmup=warmup)
    got = ema.ema_model.weight.detach().double()[0]
    torch.testing.assert_close(got, expected_average(weights, formula), rtol=1e-5, atol=1e-5)
    assert ema.last_smoothing == pytest.approx(formula(len(weights) - 1))
    assert ema.state_dict()["last_smoothing"] == ema.last_smoothing


def test_min_smoothing_is_a_floor_of_the_warmup():
    weights = weight_sequence(10)
    ema = run_emakit(weights, warmup="tf", min_smoothing=0.5)
    formula = lambda n: max(0.5, min(SMOOTHING, (1 + n) / (10 + n)))  # noqa: E731
    torch.testing.assert_close(ema.ema_model.weight.detach().double()[0], expected_average(weights, formula))


@pytest.mark.parametrize("use_ema_warmup", [False, True], ids=["tf", "power"])
def test_diffusers_ema_model_gives_the_same_average(use_ema_warmup):
    from diffusers.training_utils import EMAModel

    weights = weight_sequence()
    parameter = nn.Parameter(weights[0].clone())
    peer = EMAModel(
        [parameter], decay=SMOOTHING, min_decay=0.0, use_ema_warmup=use_ema_warmup, inv_gamma=1.0, power=2 / 3
    )
    for w in weights:  # diffusers' first step copies (its decay is 0 there), like emakit's start
        with torch.no_grad():
            parameter.copy_(w)
        peer.step([parameter])
    ema = run_emakit(weights, warmup=("power", 1, 2 / 3) if use_ema_warmup else "tf")
    torch.testing.assert_close(ema.ema_model.weight.detach()[0], peer.shadow_params[0], rtol=1e-5, atol=1e-5)
    assert ema.last_smoothing == pytest.approx(peer.cur_decay_value)


def test_torch_ema_with_num_updates_gives_the_same_average():
    from torch_ema import ExponentialMovingAverage

    weights = weight_sequence()
    parameter = nn.Parameter(weights[0].clone())
    peer = ExponentialMovingAverage([parameter], decay=SMOOTHING, use_num_updates=True)  # starts at the weights
    for w in weights[1:]:
        with torch.no_grad():
            parameter.copy_(w)
        peer.update([parameter])
    ema = run_emakit(weights, warmup="tf")
    torch.testing.assert_close(ema.ema_model.weight.detach()[0], peer.shadow_params[0], rtol=1e-5, atol=1e-5)


def test_resume_with_warmup_continues_the_schedule():
    weights = weight_sequence(20)
    whole = run_emakit(weights, warmup="tf")
    first = run_emakit(weights[:8], warmup="tf")
    resumed = EMA(smoothing=SMOOTHING, warmup="tf")
    resumed.load_state_dict(first.state_dict())
    model = nn.Linear(6, 1, bias=False)
    for w in weights[8:]:
        with torch.no_grad():
            model.weight.copy_(w)
        resumed.update(model)
    assert torch.equal(resumed.ema_model.weight, whole.ema_model.weight)


@pytest.mark.parametrize(
    "warmup", ["linear", ("power", 0, 1), ("power", 1, -1), ("power", 1), ("exp", 1, 1), ("power", True, 1)]
)
def test_bad_warmups_are_refused(warmup):
    with pytest.raises(ValueError, match="warmup="):
        EMA(smoothing=0.9, warmup=warmup)


def test_min_smoothing_above_the_smoothing_is_refused():
    with pytest.raises(ValueError, match=r"min_smoothing=0\.95"):
        EMA(smoothing=0.9, warmup="tf", min_smoothing=0.95)
    with pytest.raises(ValueError, match=r"min_smoothing=1\.0 must lie in \[0, 1\)"):
        EMA(smoothing=0.9, min_smoothing=1.0)


def test_warmup_smoothing_examples():
    assert warmup_smoothing(0.999, 1, ("tf",)) == pytest.approx(2 / 11)
    assert warmup_smoothing(0.999, 10**6, ("tf",)) == 0.999
    assert warmup_smoothing(0.9, 5, None) == 0.9


def test_the_trainer_logs_the_smoothing_each_update_used():
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Classifier, Trainer
    from emakit.loggers import InMemoryLogger

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    memory = InMemoryLogger()
    ema = EMA(smoothing=SMOOTHING, warmup="tf")
    trainer = Trainer(
        Classifier(nn.Linear(4, 3)), DataLoader(data, batch_size=8), "1ep", algorithms=[ema], loggers=[memory]
    )
    trainer.fit()
    logged = [(r["batch"], r["ema/smoothing"]) for r in memory.records if "ema/smoothing" in r]
    assert logged == [(batch, pytest.approx((1 + n) / (10 + n))) for n, batch in enumerate(range(2, 5), start=1)]
