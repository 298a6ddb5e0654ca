"""The peers' words, accepted where they do not clash: ``decay=``, a bare number of batches for ``half_life``,
``copy_to`` / ``store`` / ``restore`` (diffusers, torch_ema), ``.module`` (timm, torch), an average chosen by its label.
Each against the float64 closed form, and with the safety ``ema_weights`` has."""

from __future__ import annotations

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA


def model_and_step(seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def averaged(ema: EMA, smoothing: float, index: int | str = 0) -> nn.Module:
    """Train 5 steps of a model with ``ema`` updated after each; the average must be the closed form of
    ``smoothing``. Returns the model."""
    reference = ClosedForm(smoothing)
    model, step = model_and_step()
    for _ in range(5):
        step()
        ema.update(model)
        reference.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert reference.ema is not None
    for key, value in ema.ema_state_dict(index).items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), reference.ema[key], rtol=1e-6, atol=1e-7, msg=key)
    return model


def test_decay_is_smoothing_under_the_peers_name() -> None:
    ema = EMA(decay=0.9)
    assert ema.smoothing == 0.9 and ema.labels == ["ema@0.9"]
    averaged(ema, 0.9)
    assert EMA(decay=(0.9, 0.99)).smoothings == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"pass one of smoothing=0.9 and decay=0.99 \(the same thing\)"):
        EMA(smoothing=0.9, decay=0.99)
    with pytest.raises(ValueError, match=r"decay|smoothing"):
        EMA(decay=1.5)


def test_a_bare_number_for_half_life_counts_batches() -> None:
    assert EMA(half_life=100).half_life == EMA(half_life="100ba").half_life
    assert EMA(100).smoothing == 2 ** (-1 / 100)
    assert EMA(half_life=[50, 200]).labels == ["ema@50ba", "ema@200ba"]
    with pytest.raises(ValueError, match=r"half_life=0.999 is not a time; .* EMA\(smoothing=0.999\)"):
        EMA(0.999)  # timm's and diffusers' first argument is the decay: said so, not read as 0.999 batches


def test_copy_to_sets_the_weights_for_good() -> None:
    ema = EMA(smoothing=0.5)
    model = averaged(ema, 0.5)
    average = ema.ema_state_dict()
    ema.copy_to(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, average[key].to(value.dtype)), key
    assert not ema.swapped  # nothing to give back: the training weights are gone, as with diffusers' copy_to


def test_store_copy_to_restore_is_a_swap_with_its_checks() -> None:
    ema = EMA(smoothing=0.5)
    model = averaged(ema, 0.5)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    ema.store(model)
    ema.copy_to(model)
    assert ema.swapped
    for key, value in ema.ema_state_dict().items():
        assert torch.equal(model.state_dict()[key], value.to(training[key].dtype)), key
    ema.restore(model)
    assert not ema.swapped
    for key, value in model.state_dict().items():
        assert torch.equal(value, training[key]), f"restore gave back other training weights: {key}"
    # a write to the swapped-in average raises on restore, naming the parameter, and the training weights come back
    ema.store(model)
    ema.copy_to(model)
    with torch.no_grad():
        model[0].weight.mul_(-1)
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        ema.restore(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, training[key]), key
    assert not ema.swapped  # the failed restore still gave the training weights back
    with pytest.raises(RuntimeError, match="nothing is stored for this model; call store"):
        ema.restore(model)
    ema.store(model)
    ema.restore(model)  # store then restore without copy_to: nothing to do
    with pytest.raises(TypeError, match=r"takes the model \(an nn.Module\), not generator"):
        ema.store(model.parameters())


def test_an_average_is_chosen_by_its_label_and_module_is_ema_model() -> None:
    ema = EMA(half_life=("1ba", "3ba"))
    model = averaged(ema, 2 ** (-1 / 3), index="3ba")
    averaged(EMA(half_life=("1ba", "3ba")), 2 ** (-1 / 3), index="ema@3ba")
    for key, value in ema.ema_state_dict("ema@1ba").items():
        assert torch.equal(value, ema.ema_state_dict(0)[key]), key
    with ema.ema_weights(model, index="3ba"):
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in ema.ema_state_dict(1).items():
        assert torch.equal(inside[key], value.to(inside[key].dtype)), key
    with pytest.raises(
        ValueError, match=r"index='2ba' names no average of this EMA: its labels are \['ema@1ba', 'ema@3ba'\]"
    ):
        ema.ema_state_dict("2ba")
    assert ema.module is ema.ema_model  # timm's and torch's name, the same cached copy
