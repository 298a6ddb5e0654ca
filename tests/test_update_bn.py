"""BatchNorm statistics of the average, against torch.optim.swa_utils.update_bn on a plain copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import emakit
from emakit import EMA


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 4, generator=gen) * 3 + 1, torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_bn_matches_torch_swa_utils():
    model, reference = make_model(), make_model()
    model.eval()
    emakit.update_bn(batches(), model)
    torch_update_bn(batches(), reference)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not model.training  # the mode is restored
    assert model[1].momentum == 0.1


@pytest.mark.parametrize("flatten", [False, True])
def test_ema_update_bn_measures_the_averages_statistics_and_touches_nothing_else(flatten):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    ema = EMA(smoothing=0.5, flatten_model=flatten)
    for x, _ in batches(6):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        ema.update(model)
    training = state(model)
    parameters = {k: v.clone() for k, v in ema.state_dict()["weights"].items() if "running" not in k}
    ema.update_bn(batches(), model)
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())  # training weights and stats
    after = ema.state_dict()["weights"]
    for name, value in parameters.items():
        if "num_batches" not in name:
            assert torch.equal(after[name], value), name  # the average's parameters
    reference = copy.deepcopy(model)
    reference.load_state_dict({**training, **{k: v for k, v in after.items() if "running" not in k}})
    torch_update_bn(batches(), reference)
    for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        torch.testing.assert_close(after[name], reference.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.equal(after[name], training[name])


def test_update_bn_of_an_ema_that_has_not_started_is_refused():
    with pytest.raises(RuntimeError, match="has not started"):
        EMA(smoothing=0.5).update_bn(batches(), make_model())


def test_update_bn_of_an_empty_loader_is_refused_and_changes_nothing():
    model = make_model()
    emakit.update_bn(batches(), model)
    before = state(model)
    with pytest.raises(ValueError, match="no batches"):
        emakit.update_bn([], model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "selection",
    [{"buffers": "ignore"}, {"exclude": "*.running_*"}, {"exclude": "1.num_batches_tracked"}],
    ids=["buffers-ignored", "statistics-excluded", "count-excluded"],
)
def test_update_bn_of_an_ema_not_tracking_the_statistics_is_refused_and_changes_nothing(selection):
    """The statistics would be measured into the training model, with nowhere in the average to keep them."""
    model = make_model()
    ema = EMA(smoothing=0.9, **selection)
    ema.update(model)
    training, average = state(model), {k: v.clone() for k, v in ema.state_dict()["weights"].items()}
    with pytest.raises(
        ValueError, match=r"update_bn: this EMA does not track the BatchNorm statistics 1\.(running|num)"
    ):
        ema.update_bn(batches(), model)
    for name, value in training.items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in average.items():
        assert torch.equal(ema.state_dict()["weights"][name], value), name


def test_update_bn_with_copied_buffers_keeps_the_measured_statistics_in_the_average():
    model, reference = make_model(), make_model()
    ema = EMA(smoothing=0.9, buffers="copy")
    ema.update(model)
    training = state(model)
    ema.update_bn(batches(), model)
    torch_update_bn(batches(), reference)  # the same weights: the average is the weights after one update
    averaged = ema.ema_state_dict()
    for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        torch.testing.assert_close(averaged[name], reference.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)
    for name, value in training.items():
        assert torch.equal(model.state_dict()[name], value), name
