"""The storage engine: flat binding, zero-copy swaps, fallbacks, dtypes and state, against the closed form."""

import copy

import pytest
import torch
from torch import nn

from emakit.shadow import ShadowWeights


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float64) + 7 * step + i).reshape(p.shape).to(p.dtype))


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def closed_form(history: list[dict[str, torch.Tensor]], weight: float) -> dict[str, torch.Tensor]:
    ema = dict(history[0])
    for weights in history[1:]:
        ema = {k: ema[k] + weight * (weights[k] - ema[k]) for k in ema}
    return ema


def run_updates(shadow: ShadowWeights, model: nn.Module, steps: int, weight: float, start: int = 0):
    history = []
    for step in range(start, start + steps):
        perturb(model, step)
        history.append(float_state(model))
        if step == 0:
            shadow.copy_from_model(model)
        else:
            shadow.update(model, weight)
    return history


def assert_matches(shadow: ShadowWeights, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    state = shadow.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, atol=atol, rtol=1e-6, msg=name)


def test_parameters_are_bound_into_one_flat_buffer_and_keep_their_identity():
    model = make_model()
    params_before = list(model.parameters())
    values_before = [p.detach().clone() for p in params_before]
    shadow = ShadowWeights()
    shadow.copy_from_model(model)
    storages = {p.untyped_storage()._cdata for p in model.parameters()}
    assert len(storages) == 1
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values_before))


def test_update_matches_closed_form_and_copies_integer_buffers():
    model = make_model()
    shadow = ShadowWeights()
    model.train()
    model(torch.randn(4, 5))  # BatchNorm counts a batch
    history = run_updates(shadow, model, steps=6, weight=0.3)
    assert_matches(shadow, closed_form(history, 0.3))
    assert shadow.state_dict()["1.num_batches_tracked"].item() == 1
    assert shadow.state_dict()["1.num_batches_tracked"].dtype == torch.int64


def test_optimizer_built_before_binding_still_trains_the_model():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = ShadowWeights()
    shadow.copy_from_model(model)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 5)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    shadow.update(model, 1.0)  # weight 1: the average becomes the weights
    for name, p in model.named_parameters():
        assert torch.equal(shadow.state_dict()[name], p.detach())


def test_swap_exchanges_memory_without_copying_and_restores_bit_for_bit():
    model = make_model()
    shadow = ShadowWeights()
    run_updates(shadow, model, steps=3, weight=0.5)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v.clone() for k, v in shadow.state_dict().items()}
    ema_address = shadow.state_dict()["0.weight"].data_ptr()
    shadow.swap_in(model)
    assert model[0].weight.data_ptr() == ema_address  # the model reads the average's memory: nothing moved
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    assert shadow.state_dict()["0.weight"].equal(ema["0.weight"])  # state is right while swapped too
    shadow.swap_out(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name]), name
    assert all(torch.equal(shadow.state_dict()[k], v) for k, v in ema.items())


def test_update_while_swapped_in_is_refused():
    model = make_model()
    shadow = ShadowWeights()
    shadow.copy_from_model(model)
    shadow.swap_in(model)
    with pytest.raises(RuntimeError, match="swapped into the model"):
        shadow.update(model, 0.5)
    shadow.swap_out(model)


@pytest.mark.parametrize(
    "break_binding",
    [
        pytest.param(lambda m: m.to(torch.float64), id="model.to(float64)"),
        pytest.param(lambda m: setattr(m[0].weight, "data", m[0].weight.detach().clone()), id="param.data="),
        pytest.param(
            lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
            id="load_state_dict(assign=True)",
        ),
        pytest.param(lambda m: setattr(m, "3", nn.Linear(7, 3)), id="replaced layer"),
    ],
)
def test_a_broken_binding_is_detected_and_the_new_tensors_are_averaged(break_binding):
    model = make_model()
    shadow = ShadowWeights()
    history = run_updates(shadow, model, steps=3, weight=0.25)
    break_binding(model)
    history += run_updates(shadow, model, steps=3, weight=0.25, start=3)
    assert_matches(shadow, closed_form(history, 0.25))
    for p in model.parameters():
        if p.dtype == torch.float32:  # bound again into the engine's buffer
            assert p.untyped_storage()._cdata == model[0].bias.untyped_storage()._cdata


def test_tied_parameters_are_tracked_once():
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    shadow = ShadowWeights()
    history = run_updates(shadow, tied, steps=4, weight=0.5)
    assert "1.weight" not in shadow.state_dict()
    assert tied[1].weight is tied[0].weight
    expected = closed_form(history, 0.5)
    del expected["1.weight"]  # the same tensor as 0.weight
    assert_matches(shadow, expected)


def test_loose_tensors_that_cannot_be_bound_use_the_foreach_path():
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(torch.randn(4, 8)[:, ::2])  # not dense: a strided view
    assert not model.weight.is_contiguous()
    shadow = ShadowWeights()
    history = run_updates(shadow, model, steps=4, weight=0.5)
    assert_matches(shadow, closed_form(history, 0.5))
    assert model.weight.stride() == (8, 2)  # left as it was
    training = model.weight.detach().clone()
    shadow.swap_in(model)
    torch.testing.assert_close(model.weight.double(), closed_form(history, 0.5)["weight"])
    shadow.swap_out(model)
    assert torch.equal(model.weight, training)


def test_channels_last_weights_keep_their_memory_format():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9)
    out_before = model(x)
    shadow = ShadowWeights()
    history = run_updates(shadow, model, steps=3, weight=0.5)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert shadow.state_dict()["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert_matches(shadow, closed_form(history, 0.5))
    assert model(x).shape == out_before.shape


def test_bf16_model_gets_an_fp32_average_that_does_not_round_updates_away():
    model = nn.Linear(16, 16).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)  # bf16 spacing at 1.0 is 2**-7: a step of 1e-4 rounds away
    fp32, same = ShadowWeights(), ShadowWeights(ema_dtype="same")
    fp32.copy_from_model(model)
    same.copy_from_model(copy.deepcopy(model))
    start = model.weight.detach().float().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    other = copy.deepcopy(model)
    for _ in range(100):
        fp32.update(model, 1e-4)
        same.update(other, 1e-4)
    assert fp32.state_dict()["weight"].dtype == torch.float32
    moved = fp32.state_dict()["weight"] - start
    torch.testing.assert_close(moved, torch.full_like(moved, 1 - (1 - 1e-4) ** 100), rtol=1e-3, atol=1e-4)
    assert torch.equal(same.state_dict()["weight"].float(), start)  # bf16 average: every update rounded away


def test_cross_dtype_swap_casts_in_and_restores_the_training_weights_exactly():
    model = make_model()
    shadow = ShadowWeights(ema_dtype=torch.float64)
    history = run_updates(shadow, model, steps=3, weight=0.5)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    shadow.swap_in(model)
    expected = closed_form(history, 0.5)
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name], value.float())
    shadow.swap_out(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in training.items())


def test_offloaded_average_on_cpu_matches_closed_form():
    model = make_model()
    shadow = ShadowWeights(ema_device="cpu")
    history = run_updates(shadow, model, steps=4, weight=0.2)
    assert all(t.device.type == "cpu" for t in shadow.state_dict().values())
    assert_matches(shadow, closed_form(history, 0.2))


def test_module_shares_memory_with_the_average():
    model = make_model()
    shadow = ShadowWeights()
    run_updates(shadow, model, steps=2, weight=0.5)
    ema_model = shadow.module(model)
    assert type(ema_model) is type(model)
    history = run_updates(shadow, model, steps=2, weight=0.5, start=2)
    assert history
    assert torch.equal(ema_model[0].weight, shadow.state_dict()["0.weight"])
    assert not ema_model[0].weight.requires_grad


def test_state_loaded_before_the_model_is_seen_applies_at_first_use():
    model = make_model()
    shadow = ShadowWeights()
    run_updates(shadow, model, steps=3, weight=0.5)
    saved = {k: v.clone() for k, v in shadow.state_dict().items()}
    fresh = ShadowWeights()
    fresh.load_state_dict(saved)
    clone = copy.deepcopy(model)
    fresh.update(clone, 0.5)
    shadow.update(model, 0.5)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in shadow.state_dict().items())


def test_loading_state_of_another_model_is_refused_and_changes_nothing():
    model = make_model()
    shadow = ShadowWeights()
    shadow.copy_from_model(model)
    before = {k: v.clone() for k, v in shadow.state_dict().items()}
    bad = dict(before)
    bad["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"0\.weight"):
        shadow.load_state_dict(bad)
    del bad["0.weight"]
    with pytest.raises(ValueError, match=r"0\.weight"):
        shadow.load_state_dict(bad)
    assert all(torch.equal(shadow.state_dict()[k], v) for k, v in before.items())


def test_model_without_floating_point_tensors_is_refused():
    model = nn.Module()
    model.register_buffer("count", torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match="no floating-point"):
        ShadowWeights().copy_from_model(model)


def test_compiled_model_is_averaged_under_its_plain_names():
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    shadow = ShadowWeights()
    shadow.copy_from_model(compiled)
    assert "0.weight" in shadow.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    shadow.update(compiled, 1.0)
    assert torch.equal(shadow.state_dict()["0.weight"], model[0].weight.detach())


def test_async_update_without_cuda_warns_and_updates_synchronously():
    model = make_model()
    shadow = ShadowWeights(async_update=True)
    shadow.copy_from_model(model)
    perturb(model, 1)
    with pytest.warns(UserWarning, match="async_update=True needs a model on one CUDA device"):
        shadow.update(model, 1.0)
    assert torch.equal(shadow.state_dict()["0.weight"], model[0].weight.detach())
    assert shadow.async_update is False
