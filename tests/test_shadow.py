"""The storage engine in both modes (the default, which never re-points the model, and flatten_model=True):
updates against the float64 closed form, swaps, following a changed model, dtypes and state."""

import copy
import io
import itertools
import pickle

import pytest
import torch
from torch import nn

from emakit import EMA
from emakit.shadow import ShadowWeights
from emakit.storage.layout import normalize_device


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


MODES = [pytest.param(False, id="default"), pytest.param(True, id="flatten_model")]


def addresses(model: nn.Module) -> list[int]:
    return [t.data_ptr() for t in list(model.parameters()) + list(model.buffers())]


def assert_bound_into_one_buffer(tensors: list[torch.Tensor]) -> None:
    """Each tensor has a storage of its own bytes, and together they tile one region (64-byte aligned slots)."""
    spans = sorted((t.data_ptr(), t.untyped_storage().nbytes()) for t in tensors)
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    for (start, size), (next_start, _) in itertools.pairwise(spans):
        assert start + size <= next_start <= start + size + 64


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


def test_default_mode_never_repoints_the_model():
    model = make_model()
    params = list(model.parameters())
    before = addresses(model)
    storages = [t.untyped_storage()._cdata for t in model.parameters()]
    shadow = ShadowWeights()
    run_updates(shadow, model, steps=3, weight=0.5)
    shadow.swap_in(model)
    assert addresses(model) == before
    shadow.swap_out(model)
    assert addresses(model) == before
    assert [t.untyped_storage()._cdata for t in model.parameters()] == storages
    assert all(a is b for a, b in zip(params, model.parameters()))


def test_flatten_model_binds_each_tensor_with_a_storage_of_its_own():
    model = make_model()
    params_before = list(model.parameters())
    values_before = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = ShadowWeights(flatten_model=True)
    shadow.copy_from_model(model)
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values_before.items())
    assert_bound_into_one_buffer(list(model.parameters()))
    assert len({p.untyped_storage()._cdata for p in model.parameters()}) == len(params_before)
    assert_bound_into_one_buffer(list(shadow.state_dict().values())[:4])  # the averages of the parameters too


@pytest.mark.parametrize("flatten", MODES)
def test_update_matches_closed_form_and_copies_integer_buffers(flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    model.train()
    model(torch.randn(4, 5))  # BatchNorm counts a batch
    history = run_updates(shadow, model, steps=6, weight=0.3)
    assert_matches(shadow, closed_form(history, 0.3))
    assert shadow.state_dict()["1.num_batches_tracked"].item() == 1
    assert shadow.state_dict()["1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("flatten", MODES)
def test_optimizer_built_before_the_ema_still_trains_the_model(flatten):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = ShadowWeights(flatten_model=flatten)
    shadow.copy_from_model(model)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 5)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    shadow.update(model, 1.0)  # weight 1: the average becomes the weights
    for name, p in model.named_parameters():
        assert torch.equal(shadow.state_dict()[name], p.detach())


@pytest.mark.parametrize("flatten", MODES)
def test_swap_puts_the_average_in_and_restores_the_training_weights_bit_for_bit(flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    history = run_updates(shadow, model, steps=3, weight=0.5)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    expected = closed_form(history, 0.5)
    shadow.swap_in(model)
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name].double(), value, atol=1e-6, rtol=1e-6, msg=name)
    assert_matches(shadow, expected)  # the state is right while swapped too
    shadow.swap_out(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name]), name
    assert_matches(shadow, expected)


def test_flatten_model_swap_moves_no_data_where_torch_exchanges_storage_pointers():
    if not hasattr(torch.UntypedStorage, "_swap_data_ptr_"):
        pytest.skip("torch < 2.12 has no UntypedStorage._swap_data_ptr_: swaps park and copy")
    model = make_model()
    shadow = ShadowWeights(flatten_model=True)
    run_updates(shadow, model, steps=2, weight=0.5)
    average_address = shadow.state_dict()["0.weight"].data_ptr()
    model_address = model[0].weight.data_ptr()
    shadow.swap_in(model)
    assert model[0].weight.data_ptr() == average_address  # the model reads the average's memory
    shadow.swap_out(model)
    assert model[0].weight.data_ptr() == model_address


@pytest.mark.parametrize("flatten", MODES)
def test_update_while_swapped_in_is_refused(flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    shadow.copy_from_model(model)
    shadow.swap_in(model)
    with pytest.raises(RuntimeError, match="swapped into the model"):
        shadow.update(model, 0.5)
    shadow.swap_out(model)


def _reregister_buffer(model: nn.Module) -> None:
    model[1].running_mean = model[1].running_mean.clone()  # `self.running_mean = ...` in a forward


@pytest.mark.parametrize("flatten", MODES)
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m.to(torch.float64), id="model.to(float64)"),
        pytest.param(lambda m: setattr(m[0].weight, "data", m[0].weight.detach().clone()), id="param.data="),
        pytest.param(
            lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
            id="load_state_dict(assign=True)",
        ),
        pytest.param(lambda m: setattr(m, "3", nn.Linear(7, 3)), id="replaced layer"),
        pytest.param(lambda m: setattr(m[3], "weight", nn.Parameter(m[3].weight.detach() * 2)), id="replaced param"),
        pytest.param(_reregister_buffer, id="re-registered buffer"),
        pytest.param(lambda m: setattr(m[0].bias, "data", m[1].bias.data), id="aliased .data"),
    ],
)
def test_a_changed_model_is_followed_and_its_new_tensors_are_averaged(change, flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    history = run_updates(shadow, model, steps=3, weight=0.25)
    change(model)
    history += run_updates(shadow, model, steps=3, weight=0.25, start=3)
    assert_matches(shadow, closed_form(history, 0.25))
    if flatten:
        float_tensors = [t for t in model.state_dict(keep_vars=True).values() if t.dtype == model[0].weight.dtype]
        assert_bound_into_one_buffer([t for t in float_tensors if isinstance(t, nn.Parameter)])


@pytest.mark.parametrize("flatten", MODES)
def test_a_tensor_replaced_with_the_same_shape_keeps_the_layout_of_the_rest(flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    run_updates(shadow, model, steps=2, weight=0.5)
    averages = {k: v.data_ptr() for k, v in shadow.state_dict().items()}
    _reregister_buffer(model)
    perturb(model, 5)
    shadow.update(model, 0.5)
    assert {k: v.data_ptr() for k, v in shadow.state_dict().items()} == averages


def _replace_with_a_wider_layer(model: nn.Module) -> None:
    model[3].weight = nn.Parameter(torch.ones(3, 7).repeat(2, 1))  # (6, 7): a new shape
    model[3].bias = nn.Parameter(torch.zeros(6))


def _slice_through_data(model: nn.Module) -> None:
    model[3].weight.data = model[3].weight.data[:2]  # (2, 7): same Parameter, same address, fewer rows
    model[3].bias.data = model[3].bias.data[:2]


@pytest.mark.parametrize("flatten", MODES)
@pytest.mark.parametrize("reshape", [_replace_with_a_wider_layer, _slice_through_data], ids=["new Parameter", ".data="])
def test_a_reshaped_tensor_restarts_its_average_with_a_warning(reshape, flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    history = run_updates(shadow, model, steps=3, weight=0.5)
    reshape(model)
    with pytest.warns(RuntimeWarning, match=r"3\.weight"):
        shadow.update(model, 0.5)
    expected = closed_form(history, 0.5)
    state = shadow.state_dict()
    assert state["3.weight"].shape == model[3].weight.shape
    assert torch.equal(state["3.weight"], model[3].weight.detach())  # started from its value
    torch.testing.assert_close(state["0.weight"].double(), 0.5 * expected["0.weight"] + 0.5 * history[-1]["0.weight"])


def test_non_persistent_buffers_are_not_tracked():
    model = make_model()
    model.register_buffer("cache", torch.zeros(3), persistent=False)
    shadow = ShadowWeights()
    shadow.copy_from_model(model)
    assert "cache" not in shadow.state_dict()
    model.cache = torch.ones(5)  # a cache that grows: nothing to follow
    shadow.update(model, 0.5)
    assert set(shadow.state_dict()) == set(model.state_dict())


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


@pytest.mark.parametrize("flatten", MODES)
def test_an_average_of_another_dtype_is_updated_through_the_casting_path(flatten):
    """The path an offloaded or fp32-of-bf16 average takes (on a GPU machine tests/gpu runs the offload itself)."""
    model = make_model()
    shadow = ShadowWeights(ema_dtype=torch.float64, flatten_model=flatten)
    history = run_updates(shadow, model, steps=4, weight=0.2)
    state = shadow.state_dict()
    assert all(state[name].dtype == torch.float64 for name in history[0])
    assert_matches(shadow, closed_form(history, 0.2), atol=1e-12)
    training = float_state(model)
    shadow.swap_in(model)
    for name, value in float_state(model).items():  # the average, cast to the model's float32
        torch.testing.assert_close(value, state[name].float().double(), rtol=0, atol=0, msg=name)
    shadow.swap_out(model)
    for name, value in float_state(model).items():
        assert torch.equal(value, training[name]), name


@pytest.mark.parametrize("spelling", ["cpu", "cpu:0"])
def test_ema_device_is_compared_as_tensors_report_theirs(spelling):
    """'cpu:0' is the CPU: the average is laid out as for 'cpu' (it used to take the casting path and miss writes)."""
    assert normalize_device(spelling) == torch.device("cpu")
    model = make_model()
    shadow = ShadowWeights(ema_device=spelling)
    history = run_updates(shadow, model, steps=3, weight=0.5)
    assert all(t.device == torch.device("cpu") for t in shadow.state_dict().values())
    assert_matches(shadow, closed_form(history, 0.5))
    shadow.swap_in(model)
    with torch.no_grad():
        model[0].weight.neg_()
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        shadow.swap_out(model)
    assert_matches(shadow, closed_form(history, 0.5))


def test_flatten_model_buffers_padding_never_holds_nan(monkeypatch):
    """skip_nonfinite reads the flat model buffer whole: its alignment padding must not hold an allocator's old
    bytes. CUDA's caching allocator hands out blocks holding old values, NaN among them: torch.empty does here too."""
    real_empty = torch.empty

    def stale_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", stale_empty)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 1))  # 15 + 3 + 3 + 1 floats: every tensor padded
    from emakit import EMA

    ema = EMA(smoothing=0.5, flatten_model=True, skip_nonfinite=True)
    history = []
    for step in range(4):
        perturb(model, step)
        history.append(float_state(model))
        ema.update(model)
    assert ema.num_skipped == 0
    assert_matches(ema.shadow, closed_form(history, 0.5))


@pytest.mark.parametrize("flatten", MODES)
def test_module_is_a_copy_of_the_average_that_nothing_done_to_it_reaches(flatten):
    model = make_model()
    shadow = ShadowWeights(flatten_model=flatten)
    history = run_updates(shadow, model, steps=2, weight=0.5)
    ema_model = shadow.module(model)
    assert type(ema_model) is type(model) and ema_model is not model
    assert not ema_model[0].weight.requires_grad
    expected = closed_form(history, 0.5)

    def assert_holds(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value.double(), expected[name], atol=1e-6, rtol=1e-6, msg=name)

    assert_holds(ema_model, expected)
    assert shadow.module(model) is ema_model  # the same copy until the average changes
    shadow.swap_in(model)
    assert shadow.module(model) is ema_model
    shadow.swap_out(model)
    # what users do to a module they own: none of it reaches the average
    with torch.no_grad():
        ema_model[0].weight.neg_()
        ema_model[0].weight.data.mul_(3)
    ema_model.load_state_dict({k: torch.zeros_like(v) for k, v in ema_model.state_dict().items()})
    ema_model.half()
    ema_model.to(torch.float64)
    assert_matches(shadow, expected)
    history += run_updates(shadow, model, steps=1, weight=0.5, start=2)
    fresh = shadow.module(model)
    assert fresh is not ema_model  # the average changed: a new copy
    assert_holds(fresh, closed_form(history, 0.5))
    assert_matches(shadow, closed_form(history, 0.5))


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


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_average_before_its_first_model_holds_no_partitions_and_its_state_loads_weights_only(how):
    """Whose partitions a loaded state holds is "not said" (UNKNOWN) until one is loaded: a copy says so too. An
    ``object()`` sentinel became another object in a deep copy or a pickle: such a copy claimed that object as its
    partitioning, and an EMA's state holding it no longer loaded with ``torch.load(weights_only=True)``."""
    ema = EMA(half_life="10ba")
    clone = copy.deepcopy(ema) if how == "deepcopy" else pickle.loads(pickle.dumps(ema))
    assert clone.shadow.partitioning() is None
    buffer = io.BytesIO()
    torch.save(clone.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["partitioning"] is None
    EMA(half_life="10ba").load_state_dict(state)
    model = make_model()
    clone.update(model)
    assert clone.shadow.partitioning() is None
