"""Every CUDA path of the EMA against the float64 closed form: asynchronous updates (one and several averages, an
offloaded average), offload to pinned memory, bf16 weights with an fp32 average, flatten_model (with its staging
buffer on the average's device), swaps and their write check, the caching allocator's stale memory, a model on
another device than cuda:0, and DDP on NCCL. Skipped without CUDA; scripts/gpu-check runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from closed_form import ClosedForm  # tests/ is on the path (its conftest.py)
from torch import nn
from torchrun import torchrun

from emakit import EMA
from emakit.side_stream import pending_side_streams

DDP_SCRIPT = Path(__file__).with_name("ddp_nccl_script.py")


def make_model(device: str = "cuda", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.BatchNorm1d(65), nn.ReLU(), nn.Linear(65, 7))
    return model.to(device=device, dtype=dtype)


def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}


def train(model: nn.Module, ema: EMA, steps: int, half_lives: tuple[int, ...] = (4,)) -> list[ClosedForm]:
    """SGD on random batches, ``ema.update`` after each step; the float64 closed forms of every average."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    references = [ClosedForm(2 ** (-1 / h)) for h in half_lives]
    generator = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 33, generator=generator).to(device=device, dtype=dtype)
        optimizer.zero_grad()
        model.train()
        model(x).float().square().mean().backward()
        optimizer.step()
        ema.update(model)
        for reference in references:
            reference.update(weights64(model))
    return references


def assert_average(ema: EMA, reference: ClosedForm, index: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    state = ema.ema_state_dict(index)
    for name, value in reference.ema.items():
        torch.testing.assert_close(state[name].double().cpu(), value, rtol=rtol, atol=atol, msg=name)


def exchanges_pointers(ema: EMA, model: nn.Module) -> bool:
    """Whether a swap exchanges storage pointers (flatten_model, an average of the weights' own dtype and device):
    then a write inside the block goes into the average, and leaving says so."""
    same = all(
        a.dtype == m.dtype and a.device == m.device
        for a, m in zip(ema.ema_state_dict().values(), model.state_dict().values())
    )
    return ema.shadow.flatten_model and same and hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def assert_swap_is_exact(model: nn.Module, ema: EMA, reference: ClosedForm) -> None:
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.ema_weights(model):
        held = weights64(model)
        for name, value in reference.ema.items():
            dtype = model.state_dict()[name].dtype
            torch.testing.assert_close(held[name], value.to(dtype).double(), rtol=1e-2, atol=1e-3, msg=name)
    for name, value in training.items():
        assert torch.equal(model.state_dict()[name], value), name
    average = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    pointers = exchanges_pointers(ema, model)
    with pytest.raises(RuntimeError, match=r"0\.weight"), ema.ema_weights(model), torch.no_grad():
        model[0].weight.neg_()
    for name, value in training.items():
        assert torch.equal(model.state_dict()[name], value), name
    if not pointers:  # the write was made to a copy of the average: the average is unchanged
        for name, value in average.items():
            assert torch.equal(ema.ema_state_dict()[name], value), name


@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_synchronous_updates_and_swaps(flatten, dtype):
    model = make_model(dtype=dtype)
    ema = EMA(half_life="4ba", flatten_model=flatten)
    (reference,) = train(model, ema, steps=12)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    assert_average(ema, reference, **tolerance)
    if dtype == torch.bfloat16:
        assert all(t.dtype == torch.float32 for t in ema.ema_state_dict().values() if t.is_floating_point())
    assert_swap_is_exact(model, ema, reference)


@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
@pytest.mark.parametrize("spelling", ["cuda", "cuda:0"])
def test_an_average_on_cuda_spelled_without_an_index_is_the_models_device(flatten, spelling):
    """'cuda' is cuda:0 here: no casting path, no staging buffer on the CPU (which failed at the second update)."""
    model = make_model()
    ema = EMA(half_life="4ba", ema_device=spelling, flatten_model=flatten)
    (reference,) = train(model, ema, steps=6)
    assert_average(ema, reference)
    assert all(t.device == torch.device("cuda", 0) for t in ema.ema_state_dict().values())
    assert_swap_is_exact(model, ema, reference)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_offloaded_average_lives_in_pinned_host_memory(asynchronous, flatten, dtype):
    model = make_model(dtype=dtype)
    ema = EMA(half_life="4ba", ema_device="cpu", async_update=asynchronous, flatten_model=flatten)
    (reference,) = train(model, ema, steps=10)
    state = ema.state_dict()["weights"]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in state.values())
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    assert_average(ema, reference, **tolerance)
    assert_swap_is_exact(model, ema, reference)
    assert pending_side_streams() == []


@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flatten_model"])
def test_asynchronous_updates_of_several_averages(flatten):
    model = make_model()
    ema = EMA(half_life=("2ba", "4ba", "8ba"), async_update=True, flatten_model=flatten)
    references = train(model, ema, steps=12, half_lives=(2, 4, 8))
    for index, reference in enumerate(references):
        assert_average(ema, reference, index)
    assert pending_side_streams() == []


def test_asynchronous_updates_overlap_a_busy_forward_and_stay_exact():
    """Large weights and a long forward queued right after each update: the update really runs alongside."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]).cuda()
    ema = EMA(half_life="3ba", async_update=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    reference = ClosedForm(2 ** (-1 / 3))
    x = torch.randn(4096, 2048, device="cuda")
    for _ in range(6):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()  # waits for the previous update through the hook
        ema.update(model)
        reference.update(weights64(model))
        with torch.no_grad():
            model(x)  # queued on the main stream while the update runs on the side stream
    assert_average(ema, reference)


def test_asynchronous_update_survives_the_model_moving_and_the_ema_being_dropped():
    model = make_model()
    ema = EMA(half_life="4ba", async_update=True)
    (reference,) = train(model, ema, steps=4)
    average = ema.ema_state_dict()
    ema.update(model)  # queued; now the model moves away and its old memory is freed
    model.to("cpu")
    filler = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]  # reuse freed blocks
    reference.update(weights64(model))
    assert_average(ema, reference)
    del filler
    model.cuda()
    ema.update(model)
    del ema  # dropped with an update queued: its memory is not handed out before the update ends
    filler = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    del filler
    assert average  # the earlier copy is the caller's and unharmed
    assert all(torch.isfinite(t).all() for t in average.values() if t.is_floating_point())


def test_flatten_model_with_skip_nonfinite_on_memory_the_allocator_filled_with_nan():
    stale = [torch.full((4096,), float("nan"), device="cuda") for _ in range(64)]
    del stale  # the caching allocator keeps these blocks and hands them out again, NaN and all
    model = make_model()
    ema = EMA(half_life="4ba", flatten_model=True, skip_nonfinite=True)
    (reference,) = train(model, ema, steps=6)
    assert ema.num_skipped == 0
    assert_average(ema, reference)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_model_on_the_second_device(asynchronous):
    model = make_model(device="cuda:1")
    ema = EMA(half_life="4ba", async_update=asynchronous)
    (reference,) = train(model, ema, steps=8)
    assert all(t.device == torch.device("cuda", 1) for t in ema.ema_state_dict().values())
    assert_average(ema, reference)
    assert_swap_is_exact(model, ema, reference)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_ddp_on_nccl_keeps_every_ranks_average_at_the_closed_form(tmp_path, asynchronous):
    nproc = min(2, torch.cuda.device_count())  # NCCL refuses two ranks on one device
    result = torchrun(DDP_SCRIPT, str(tmp_path), str(int(asynchronous)), nproc=nproc, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    reference = ClosedForm(2 ** (-1 / 4))
    for weights in ranks[0]["steps"]:
        reference.update(weights)
    for rank in ranks:
        for name, value in reference.ema.items():
            torch.testing.assert_close(rank["average"][name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
        for name, value in rank["average"].items():
            assert torch.equal(value, ranks[0]["average"][name]), name
