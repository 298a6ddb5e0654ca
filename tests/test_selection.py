"""Which tensors an EMA tracks: include/exclude patterns, trainable_only, and the buffer policy.

Each case against the float64 closed form of the tracked tensors and the untouched model for the rest.
"""

from __future__ import annotations

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA

SMOOTHING = 0.5


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def train(model: nn.Module, ema: EMA, steps: int = 4) -> ClosedForm:
    """SGD steps with the EMA updated after each; the closed form of every floating-point tensor, in float64."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    reference = ClosedForm(SMOOTHING)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=gen)).square().mean().backward()
        optimizer.step()
        reference.update(
            {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        )
        ema.update(model)
    return reference


def assert_average(ema: EMA, reference: ClosedForm, names: set[str]) -> None:
    weights = ema.state_dict()["weights"]
    assert {n for n, t in weights.items() if t.is_floating_point()} == names
    for name in names:
        torch.testing.assert_close(weights[name].double(), reference.ema[name], rtol=1e-5, atol=1e-6, msg=name)


def test_exclude_leaves_matching_tensors_untracked_and_unswapped():
    model = make_model()
    ema = EMA(smoothing=SMOOTHING, exclude="3.*")
    reference = train(model, ema)
    assert_average(ema, reference, {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"})
    last = model[3].weight.detach().clone()
    with ema.ema_weights(model):
        assert torch.equal(model[3].weight, last)  # untracked: the model keeps its own
        torch.testing.assert_close(model[0].weight.double(), reference.ema["0.weight"], rtol=1e-5, atol=1e-6)
    copied = ema.ema_model[3].weight  # untracked: the model's own values, copied (ema_model owns its tensors)
    assert torch.equal(copied, model[3].weight) and copied.data_ptr() != model[3].weight.data_ptr()


def test_include_tracks_only_matching_tensors():
    model = make_model()
    ema = EMA(smoothing=SMOOTHING, include=["*.weight"], buffers="ignore")
    reference = train(model, ema)
    assert_average(ema, reference, {"0.weight", "1.weight", "3.weight"})


def test_trainable_only_skips_a_frozen_base_and_follows_an_unfrozen_one():
    model = make_model()
    model[0].requires_grad_(False)
    ema = EMA(smoothing=SMOOTHING, trainable_only=True)
    reference = train(model, ema)
    tracked = {"1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias"}
    assert_average(ema, reference, tracked)
    assert torch.equal(ema.ema_model[0].weight, model[0].weight)
    assert ema.ema_model[0].weight.data_ptr() != model[0].weight.data_ptr()
    everything = EMA(smoothing=SMOOTHING)
    everything.update(model)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    assert everything.shadow.nbytes - ema.shadow.nbytes >= frozen_bytes  # no copy of the frozen base
    model[0].requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"0\.weight"):
        ema.update(model)
    assert torch.equal(ema.state_dict()["weights"]["0.weight"], model[0].weight.detach())  # starts at its value


def test_buffers_copy_follows_the_model_and_ignore_leaves_them_alone():
    model = make_model()
    copied = EMA(smoothing=SMOOTHING, buffers="copy")
    train(model, copied)
    assert torch.equal(copied.state_dict()["weights"]["1.running_mean"], model[1].running_mean)  # copied, not averaged
    ignored = EMA(smoothing=SMOOTHING, buffers="ignore")
    ignored.update(model)
    assert not any(name.startswith("1.running") for name in ignored.state_dict()["weights"])
    model.train()
    with ignored.ema_weights(model):
        model(torch.randn(8, 4))  # a train-mode forward updates the model's own statistics: they are not swapped
        inside = model[1].running_mean.clone()
    assert torch.equal(model[1].running_mean, inside)


def test_saved_weights_of_a_selection_load_into_a_plain_model_without_strict(tmp_path):
    from safetensors.torch import load_file

    model = make_model()
    ema = EMA(smoothing=SMOOTHING, exclude="3.*")
    train(model, ema)
    weights = load_file(ema.save_ema_weights(tmp_path / "ema.safetensors"))
    assert not any(key.startswith("3.") for key in weights)
    plain = make_model()
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert set(missing) == {"3.weight", "3.bias"} and not unexpected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": []}, "include=\\[\\]"),
        ({"include": 3}, "include=3"),
        ({"exclude": ["ok", ""]}, "exclude="),
        ({"buffers": "avg"}, "buffers='avg' must be one of"),
        ({"trainable_only": "yes"}, "trainable_only='yes'"),
    ],
)
def test_bad_selections_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(smoothing=0.9, **kwargs)


def test_a_selection_with_nothing_to_average_is_refused():
    with pytest.raises(ValueError, match="among those selected"):
        EMA(smoothing=0.9, include="nothing.*").update(make_model())
