"""Writes into a model while an average is swapped in are never silent: property tests over write patterns.

README promise: an in-place change of a tracked parameter inside ``ema_weights`` — any dtype, any
pattern (a sign flip, a permutation, +d/-d pairs, a single bit), through the parameter, ``.data`` or
numpy — makes leaving the block raise, naming the parameter; the training weights come back bit for
bit and the average is unchanged, bit for bit (the write was made to the model's copy of it). With
``flatten_model=True`` and an average of the model's own dtype, the swap exchanges storage pointers:
writes through the parameter (an optimizer step, an in-place op, a view) raise, naming it; writes
through ``.data`` or numpy are outside that mode's contract.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emakit import EMA

SETTINGS = settings(max_examples=120, deadline=None)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INTEGER_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).to(dtype)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.5, -0.5]))  # a tensor whose sign flip keeps its sum of bits
    return model


def trained_ema(dtype: torch.dtype, flatten: bool) -> tuple[nn.Module, EMA]:
    model, ema = make_model(dtype), EMA(smoothing=0.5, flatten_model=flatten)
    for step in range(3):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.cos(torch.arange(p.numel()) + step + i).reshape(p.shape).to(dtype))
        ema.update(model)
    return model, ema


def bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in state.items()}


def apply(pattern: str, target: torch.Tensor, data: st.DataObject) -> None:
    """Write ``pattern`` into ``target`` (a parameter, its ``.data`` or a tensor over its numpy array) in place."""
    n = target.numel()
    flat = target.view(-1)
    if pattern == "sign flip":
        flat.neg_()
    elif pattern == "permutation":
        order = data.draw(st.permutations(range(n)))
        flat.copy_(flat[torch.tensor(order)].clone())
    elif pattern == "+d/-d":
        i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        d = data.draw(st.sampled_from([1e-3, 0.25, 1.0, 3.0]))
        flat[i] += d
        flat[j] -= d
    elif pattern == "one bit":
        k, b = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 8 * target.element_size() - 1))
        integers = flat.view(INTEGER_OF[target.dtype])
        mask = torch.tensor(1 << b if b < 8 * target.element_size() - 1 else -(1 << b), dtype=integers.dtype)
        integers[k] ^= mask
    else:
        raise ValueError(pattern)


PATTERNS = ["sign flip", "permutation", "+d/-d", "one bit"]


@SETTINGS
@given(
    dtype=st.sampled_from(list(DTYPES)),
    flatten=st.booleans(),
    channel=st.sampled_from(["parameter", ".data", "numpy"]),
    pattern=st.sampled_from(PATTERNS),
    which=st.integers(0, 3),
    data=st.data(),
)
def test_a_write_of_any_pattern_raises_naming_it_and_leaves_the_average_unchanged(
    dtype, flatten, channel, pattern, which, data
):
    dtype = DTYPES[dtype]
    model, ema = trained_ema(dtype, flatten)
    pointer_exchange = flatten and dtype == torch.float32 and hasattr(torch.UntypedStorage, "_swap_data_ptr_")
    if channel == "numpy" and dtype == torch.bfloat16:
        channel = ".data"  # numpy has no bfloat16
    if pointer_exchange and channel != "parameter":
        channel = "parameter"  # .data and numpy are outside flatten_model's contract (see the module docstring)
    name, parameter = list(model.named_parameters())[which]

    def write() -> str:
        if channel == "parameter":
            with torch.no_grad():
                apply(pattern, parameter, data)
        elif channel == ".data":
            apply(pattern, parameter.data, data)
        else:
            apply(pattern, torch.from_numpy(parameter.detach().numpy()), data)
        return name

    average = bits(ema.state_dict()["weights"])
    with pytest.raises((RuntimeError, LookupError)) as raised, ema.ema_weights(model):
        before = bits(model.state_dict())
        write()
        changed = sorted(n for n, b in bits(model.state_dict()).items() if b != before[n])
        if not changed and not pointer_exchange:
            raise LookupError("the pattern changed no byte")  # e.g. a permutation of equal values
    if raised.type is LookupError:
        assert bits(ema.state_dict()["weights"]) == average
        return
    message = str(raised.value)
    assert re.search(rf"\({re.escape(name)}[,)]|, {re.escape(name)}[,)]", message), message
    if not pointer_exchange:
        assert changed == [name]
        assert "average is unchanged" in message
        assert bits(ema.state_dict()["weights"]) == average, "the average, bit for bit"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
def test_no_write_means_no_error_and_everything_bit_for_bit(dtype, flatten):
    model, ema = trained_ema(DTYPES[dtype], flatten)
    training, average = bits(model.state_dict()), bits(ema.state_dict()["weights"])
    with ema.ema_weights(model), torch.no_grad():
        model.train()
        model(torch.randn(5, 4, dtype=DTYPES[dtype]))  # a train-mode forward writes BatchNorm statistics: allowed
    assert bits(model.state_dict()) == training
    assert bits(ema.state_dict()["weights"]) == average


def test_a_sign_flip_of_a_tensor_whose_bit_sum_it_keeps_is_caught():
    """The write check used to be a wrapping sum of bit patterns: ``neg_`` of an even number of elements kept it."""
    model, ema = trained_ema(torch.float32, flatten=False)
    average = bits(ema.state_dict()["weights"])
    with pytest.raises(RuntimeError, match=r"2\.bias"), ema.ema_weights(model), torch.no_grad():
        model[2].bias.neg_()
    assert bits(ema.state_dict()["weights"]) == average


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_write_into_a_low_precision_model_is_not_dropped_silently(dtype):
    """bf16/fp16 models have an fp32 average: the write used to be discarded without a word."""
    model, ema = trained_ema(DTYPES[dtype], flatten=False)
    with pytest.raises(RuntimeError, match=r"0\.weight.*average is unchanged"), ema.ema_weights(model), torch.no_grad():
        model[0].weight.add_(1.0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
@pytest.mark.parametrize("pattern", ["sign flip", "last bit of the last element", "first element +1"])
def test_a_write_into_a_large_tensor_compared_where_it_lies_is_caught(dtype, flatten, pattern):
    """Tensors of 64 KiB and more are compared in place (the small ones are gathered): both paths are exact."""
    dtype = DTYPES[dtype]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 201), nn.Linear(201, 3)).to(dtype)  # 60,300 elements: compared in place
    ema = EMA(smoothing=0.5, flatten_model=flatten)
    ema.update(model)
    pointer_exchange = flatten and dtype == torch.float32 and hasattr(torch.UntypedStorage, "_swap_data_ptr_")
    average, training = bits(ema.state_dict()["weights"]), bits(model.state_dict())
    with pytest.raises(RuntimeError, match=r"\(0\.weight\)"), ema.ema_weights(model), torch.no_grad():
        weight = model[0].weight.view(-1)
        if pattern == "sign flip":
            weight.neg_()
        elif pattern == "first element +1":
            weight[0] += 1
        else:
            weight.view(INTEGER_OF[dtype])[-1] ^= 1
    assert bits(model.state_dict()) == training
    if not pointer_exchange:
        assert bits(ema.state_dict()["weights"]) == average
