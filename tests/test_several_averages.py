"""One EMA keeping several averages (several half-lives), against single EMAs and the float64 closed form."""

from __future__ import annotations

import pytest
import torch
from closed_form import ClosedForm
from safetensors.torch import load_file
from torch import nn

from emakit import EMA

SMOOTHINGS = (0.5, 0.8, 0.95)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))


def train(model: nn.Module, emas: list[EMA], steps: int = 5) -> list[dict[str, torch.Tensor]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=gen)).square().mean().backward()
        optimizer.step()
        history.append({k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()})
        for ema in emas:
            ema.update(model)
    return history


def test_each_average_equals_a_single_ema_and_its_closed_form():
    model = make_model()
    several, singles = EMA(smoothing=SMOOTHINGS), [EMA(smoothing=s) for s in SMOOTHINGS]
    history = train(model, [several, *singles])
    for index, (single, smoothing) in enumerate(zip(singles, SMOOTHINGS)):
        reference = ClosedForm(smoothing)
        for weights in history:
            reference.update(weights)
        average = several.ema_model_at(index).state_dict()
        for name, value in single.ema_model.state_dict().items():
            assert torch.equal(average[name], value), (index, name)
            if value.is_floating_point():
                torch.testing.assert_close(average[name].double(), reference.ema[name], rtol=1e-5, atol=1e-6)


class Wide(nn.Module):
    """A weight of 1.4 MB with an odd size, a channels_last conv, BatchNorm buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(701, 501)
        self.conv = nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
        self.norm = nn.BatchNorm1d(501)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.wide(x)).sum() + self.conv(x[:, :75].reshape(-1, 3, 5, 5)).sum()


@pytest.mark.parametrize(
    "options",
    [{}, {"flatten_model": True}, {"ema_dtype": torch.float64}, {"buffers": "copy"}],
    ids=["default", "flatten_model", "cast", "copied_buffers"],
)
def test_several_averages_equal_separate_emas_bit_for_bit_in_every_mode(options):
    torch.manual_seed(0)
    model = Wide()
    several = EMA(smoothing=SMOOTHINGS, **options)
    singles = [EMA(smoothing=s, ema_dtype=options.get("ema_dtype", "auto")) for s in SMOOTHINGS]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = [ClosedForm(s) for s in SMOOTHINGS]
    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(6, 701, generator=torch.Generator().manual_seed(step))).backward()
        optimizer.step()
        weights = {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        for ema, closed_form in zip([several, *singles], [None, *reference]):
            ema.update(model)
            if closed_form is not None:
                closed_form.update(weights)
    for index, single in enumerate(singles):
        average = several.ema_model_at(index).state_dict()
        for name, value in single.ema_model.state_dict().items():
            if options.get("buffers") == "copy" and name in dict(model.named_buffers()):
                value = model.state_dict()[name]
            assert torch.equal(average[name], value), (index, name)
        torch.testing.assert_close(average["wide.weight"].double(), reference[index].ema["wide.weight"])


def test_ema_weights_and_exports_by_index(tmp_path):
    model = make_model()
    ema = EMA(half_life=("2ba", "8ba"))
    train(model, [ema])
    training = {k: v.clone() for k, v in model.state_dict().items()}
    for index in (0, 1):
        with ema.ema_weights(model, index=index):
            for name, value in ema.ema_model_at(index).state_dict().items():
                assert torch.equal(model.state_dict()[name], value), name
        saved = load_file(ema.save_ema_weights(tmp_path / f"{index}.safetensors", index=index))
        assert all(torch.equal(saved[k], v) for k, v in ema.ema_model_at(index).state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in training.items())
    assert ema.labels == ["ema@2ba", "ema@8ba"]
    with pytest.raises(ValueError, match=r"index=2 must be an int in \[0, 2\)"):
        ema.ema_weights(model, index=2)


def test_state_resumes_every_average_exactly():
    model = make_model()
    whole = EMA(smoothing=SMOOTHINGS, warmup="tf")
    history_model = make_model()
    train(history_model, [whole], steps=8)
    first = EMA(smoothing=SMOOTHINGS, warmup="tf")
    train(model, [first], steps=4)
    resumed = EMA(smoothing=SMOOTHINGS, warmup="tf")
    resumed.load_state_dict(first.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # the same batches as steps 1-4 of train(): draw them, then continue with steps 5-8
        torch.randn(8, 4, generator=gen)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=gen)).square().mean().backward()
        optimizer.step()
        resumed.update(model)
    # the optimizer restarted (plain SGD keeps no state), so the weights match step for step
    for index in range(3):
        a, b = whole.ema_model_at(index).state_dict(), resumed.ema_model_at(index).state_dict()
        assert all(torch.equal(a[k], v) for k, v in b.items()), index
    with pytest.raises(ValueError, match="holds 3 averages; this EMA keeps 1"):
        EMA(smoothing=0.5).load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smoothing": (0.9, 0.9)}, "repeats"),
        ({"smoothing": ()}, "is empty"),
        ({"half_life": ("10ba", "1ep")}, "share a unit"),
        ({"half_life": ("10ba", "0ba")}, "must be > 0"),
    ],
)
def test_bad_sets_of_averages_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


def test_compile_update_moves_every_average_in_one_compiled_pass_equal_to_the_closed_form():
    from torch._dynamo.utils import counters

    from emakit.storage import fused

    counters.clear()
    model, plain_model = make_model(), make_model()
    kinds = ["exponential"] * len(SMOOTHINGS) + ["uniform"]
    ema = EMA(smoothing=SMOOTHINGS, average=kinds, flatten_model=True, compile_update=True)
    plain = EMA(smoothing=SMOOTHINGS, average=kinds, flatten_model=True)
    history = train(model, [ema])
    train(plain_model, [plain])  # the same run, averaged eagerly
    assert counters["stats"]["unique_graphs"] == 1  # one kernel (dynamic sizes: every group)
    for index, smoothing in enumerate(SMOOTHINGS):
        reference = ClosedForm(smoothing)
        for weights in history:
            reference.update(weights)
        average = ema.ema_state_dict(index)
        for name, value in reference.ema.items():
            torch.testing.assert_close(average[name].double(), value, rtol=1e-5, atol=1e-6, msg=f"{index} {name}")
            torch.testing.assert_close(average[name], plain.ema_state_dict(index)[name], rtol=1e-6, atol=1e-7)
    uniform = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    for name, value in uniform.items():
        torch.testing.assert_close(ema.ema_state_dict("uniform")[name].double(), value, rtol=1e-5, atol=1e-6)
    assert fused._kernels and not fused._failed


def test_compile_update_falls_back_with_a_warning_when_torch_compile_fails(monkeypatch):
    from emakit.storage import fused

    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_kernels", {})
    monkeypatch.setattr(fused, "_failed", [])
    monkeypatch.setattr(torch, "compile", refuse)
    model = make_model()
    ema = EMA(smoothing=SMOOTHINGS, flatten_model=True, compile_update=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed \\(RuntimeError: no compiler here\\)"):
        history = train(model, [ema])
    reference = ClosedForm(SMOOTHINGS[1])
    for weights in history:
        reference.update(weights)
    for name, value in reference.ema.items():
        torch.testing.assert_close(ema.ema_state_dict(1)[name].double(), value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compile_update=True: True needs flatten_model=True"):
        EMA(compile_update=True)
