"""Run under torchrun with 2 processes (gloo): ``EMA(shard_over_ranks=True)`` of a DDP model, by hand.

Usage: shard_over_ranks_script.py DTYPE OUT_DIR

Each rank trains a DDP model (fp32, or bf16 with an fp32 average) on batches of its own, with two EMAs that keep
half of the average each: one smoothing, and one of two smoothings (several averages). It checks:

- no collective runs inside ``ema.update`` (every ``torch.distributed`` collective is counted; positive controls:
  the counter sees the swap's all-gather and the export's sends);
- the full average, put together from every rank's state (gathered for the check only: ``all_gather_object`` of
  the pieces, laid end to end in rank order as documented), equals the float64 closed form of the weights on every
  rank; ``ema_state_dict()`` and ``save_ema_weights`` give it on rank 0 (and load into the plain model);
  ``ema_model`` gives it on every rank;
- each rank's average holds at most 1/2 of the unsharded average's bytes + 1%;
- ``with ema.ema_weights(model):`` the model's forward equals a plain model holding the exported average; outside,
  training ends bit for bit as a DDP model trained without an EMA;
- an EMA resumed from a state saved mid-run (``torch.save`` / ``torch.load(weights_only=True)``), loaded before and
  after it sees the model, ends bit for bit as the uninterrupted one; another rank's state, another world size's,
  and a whole (unsplit) state are refused naming both;
- a write inside the swap (on every rank, or on one rank only, into its own slice) raises on every rank, naming the
  parameter; the training weights come back bit for bit and the average is unchanged;
- ``train_with_ema_weights=True`` puts the whole average into the model on every rank; ``update_bn`` works;
  warmup and ``skip_nonfinite`` follow the unsplit schedule; a reshaped parameter restarts its average while the
  others' are carried into the new split; channels-last tensors (split in memory order) export, swap and make
  ``ema_model`` in their own layout;
- weights FSDP2 shards already are refused, naming it.

Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from collectives import counting_collectives
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emakit import EMA

SMOOTHING = 2 ** (-1 / 4)  # a half-life of 4 updates
SECOND = 2 ** (-1 / 2)
STEPS = 6
RESUME_AT = 3


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.BatchNorm1d(256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)
    )  # fmt: skip
    return model.to(dtype)


def batch(step: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # every rank trains on its own data
    return torch.randn(8, 32, generator=generator).to(dtype)


def train_step(ddp: nn.Module, optimizer: torch.optim.Optimizer, step: int, dtype: torch.dtype) -> None:
    ddp.train()
    ddp(batch(step, dtype)).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state in float64 (parameters equal on every rank; BatchNorm statistics each
    rank's own)."""
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def closed_form(history: list[dict[str, torch.Tensor]], s: float) -> dict[str, torch.Tensor]:
    """``ema_n = s^(n-1) w_1 + sum_{k=2..n} (1 - s) s^(n-k) w_k`` in float64: the first update starts the average."""
    n = len(history)
    return {
        name: s ** (n - 1) * history[0][name]
        + sum((1 - s) * s ** (n - k) * history[k - 1][name] for k in range(2, n + 1))
        for name in history[0]
    }


def assembled(state: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole average from every rank's state (collective, for the check only): each parameter's pieces laid end
    to end in rank order; buffers are whole in each rank's own state."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, {"weights": state["weights"], "partitioning": state["partitioning"]})
    assert [s["partitioning"]["rank"] for s in states] == list(range(dist.get_world_size())), states
    shapes = dict(model.state_dict())
    params = {name for name, _ in model.named_parameters()}
    whole = {}
    for name, value in state["weights"].items():
        if name in params:
            pieces = torch.cat([s["weights"][name].reshape(-1) for s in states])
            whole[name] = pieces.view(shapes[name].shape)
        else:
            whole[name] = value
    return whole


def assert_matches(average: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    average = {k: v for k, v in average.items() if v.is_floating_point()}
    assert set(average) == set(expected), (what, sorted(average), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(average[name].double(), value, atol=2e-6, rtol=1e-5, msg=f"{what}: {name}")


def expect_error(action, *needles: str, error: type[Exception] = ValueError) -> str:
    try:
        action()
    except error as raised:
        for needle in needles:
            assert needle in str(raised), f"expected {needle!r} in: {raised}"
        return str(raised)
    raise AssertionError(f"not refused: expected {needles}")


def main(dtype_name: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, twin = make_model(dtype), make_model(dtype)  # twin: trained the same way, without an EMA
    ddp, ddp_twin = DistributedDataParallel(model), DistributedDataParallel(twin)
    optimizer, optimizer_twin = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin))
    ema = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
    several = EMA(smoothing=[SMOOTHING, SECOND], shard_over_ranks=True)
    warm = EMA(smoothing=SMOOTHING, warmup="tf", skip_nonfinite=True, shard_over_ranks=True)
    warm_whole = EMA(smoothing=SMOOTHING, warmup="tf", skip_nonfinite=True)  # the schedule, unsplit
    probe = torch.randn(5, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    history, evaluations, resumed, late = [], [], None, None
    for step in range(1, STEPS + 1):
        train_step(ddp, optimizer, step, dtype)
        train_step(ddp_twin, optimizer_twin, step, dtype)
        with counting_collectives() as calls:
            ema.update(ddp)  # the DDP wrapper or the module: the same model
            several.update(model)
            warm.update(model)
            if resumed is not None:
                resumed.update(model)
                late.update(model)
        assert calls == [], f"ema.update communicated: {calls}"
        warm_whole.update(model)
        history.append(weights(model))
        model.eval()
        with torch.no_grad(), counting_collectives() as calls, ema.ema_weights(model):
            evaluations.append(model(probe).float())
        assert {"all_gather_single", "all_gather_into_tensor"} & set(calls), f"the swap's gather not seen: {calls}"
        if step == RESUME_AT:
            buffer = io.BytesIO()
            torch.save(ema.state_dict(), buffer)
            (out / f"state-rank{rank}.pt").write_bytes(buffer.getvalue())
            state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
            assert state["partitioning"] == {
                "engine": "shard_over_ranks", "rank": rank, "world_size": world,
                "total": sum(p.numel() for p in model.parameters()),
            }, state["partitioning"]  # fmt: skip
            resumed = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
            resumed.load_state_dict(state)  # before it sees the model: laid out at its first update
            late = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
            late.attach(model)
            late.load_state_dict(state)  # after

    expected = closed_form(history, SMOOTHING)
    state = ema.state_dict()
    assert_matches(assembled(state, model), expected, f"rank {rank}: the average assembled from every rank's slice")
    assert_matches(assembled(several.state_dict(), model), expected, "several averages: the first")
    second = assembled({**several.state_dict(), "weights": several.state_dict()["more_weights"][0]}, model)
    assert_matches(second, closed_form(history, SECOND), "several averages: the second")

    warmed, unsplit = assembled(warm.state_dict(), model), warm_whole.state_dict()["weights"]
    for name, value in unsplit.items():
        torch.testing.assert_close(warmed[name], value, atol=1e-6, rtol=1e-6, msg=f"warmup: {name}")

    # bytes: about 1/2 of the unsharded average on each rank
    whole = EMA(smoothing=SMOOTHING)
    whole.update(make_model(dtype))
    ratio = ema.shadow.nbytes / whole.shadow.nbytes
    assert ratio <= 1 / world + 0.01, f"rank {rank}'s average holds {ratio:.4f} of the unsharded one's bytes"
    print(f"rank {rank}: the average holds {ratio:.4f} of the unsharded bytes", flush=True)

    # exports: rank 0 receives the whole average, one tensor at a time
    with counting_collectives() as calls:
        exported = ema.ema_state_dict()
    assert calls, "the export's gather was not seen"  # positive control: sends on rank 1, receives on rank 0
    assert (exported != {}) == (rank == 0), f"rank {rank}: exports gather to rank 0 only"
    if rank == 0:
        assert_matches(exported, expected, "ema_state_dict")
    path = ema.save_ema_weights(out / f"ema-{dtype_name}.safetensors")
    dist.barrier()
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(safetensors.torch.load_file(path))  # strict: every tensor, full shapes
        assert_matches(weights(plain), expected, "save_ema_weights")
    assert_matches(weights(ema.ema_model), expected, f"rank {rank}: ema_model")  # gathered to every rank

    # evaluation inside ema_weights saw the average: against a plain model holding it (the export, rank 0's; each
    # rank's own: the assembled average)
    reference = make_model(dtype)
    reference.load_state_dict(assembled(state, model))  # cast to the model's dtype, as the swap casts
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(evaluations[-1], reference(probe).float(), msg="forward inside ema_weights")

    # training bit for bit as without the EMA
    mine, theirs = model.state_dict(), twin.state_dict()
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), f"training with the EMA differs from without it: {name}"

    # resume, before and after the EMA saw the model
    for other in (resumed, late):
        for name, value in state["weights"].items():
            assert torch.equal(other.state_dict()["weights"][name], value), f"resumed EMA differs: {name}"

    check_refusals(ema, model, state, out, rank, world)
    check_writes_inside_a_swap(ema, model, rank)
    check_train_with_ema_weights(model, dtype)
    check_update_bn(ema, model, dtype)
    check_fsdp2_refused(rank)
    check_a_changed_model_is_laid_out_again(dtype)
    check_channels_last(rank)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def check_refusals(ema: EMA, model: nn.Module, state: dict, out: Path, rank: int, world: int) -> None:
    """Another rank's state, another world size's and a whole state are refused, naming both."""
    dist.barrier()  # every rank wrote its state at RESUME_AT
    other = torch.load(out / f"state-rank{1 - rank}.pt", weights_only=True)
    pending = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
    pending.load_state_dict(other)  # not laid out yet: checked at the first update
    expect_error(lambda: pending.update(model), f"slices of rank {1 - rank} of {world}", f"rank {rank} of {world}")
    attached = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
    attached.update(model)
    expect_error(lambda: attached.load_state_dict(other), f"slices of rank {1 - rank} of {world}")
    bigger = {**state, "partitioning": {**state["partitioning"], "world_size": 4}}
    expect_error(lambda: attached.load_state_dict(bigger), f"rank {rank} of 4", "this model has the shard_over_ranks")
    unsplit = EMA(smoothing=SMOOTHING)
    unsplit.update(model)
    expect_error(lambda: attached.load_state_dict(unsplit.state_dict()), "holds whole tensors")
    expect_error(lambda: unsplit.load_state_dict(state), f"slices of rank {rank} of {world}", "this model has whole")


def check_writes_inside_a_swap(ema: EMA, model: nn.Module, rank: int) -> None:
    """A write inside the swap raises on every rank, naming the parameter; the training weights come back bit for bit
    and the average is unchanged. The last layer lies in rank 1's slice, the first in rank 0's."""
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_average = {k: v.clone() for k, v in ema.state_dict()["weights"].items()}

    def write_everywhere() -> None:
        with torch.no_grad(), ema.ema_weights(model):
            model[5].weight.mul_(-1)  # every rank writes (an optimizer step inside the block would)

    def write_on_rank_0() -> None:
        with torch.no_grad(), ema.ema_weights(model):
            if rank == 0:
                model[0].bias.add_(1)  # one rank only, into its own slice

    expect_error(write_everywhere, "1 parameter(s) were written", "5.weight", error=RuntimeError)
    expect_error(write_on_rank_0, "1 parameter(s) were written", "0.bias", error=RuntimeError)
    for name, value in before_model.items():
        assert torch.equal(model.state_dict()[name], value), f"the training weights did not come back: {name}"
    for name, value in before_average.items():
        assert torch.equal(ema.state_dict()["weights"][name], value), f"a write inside the swap reached: {name}"


def check_train_with_ema_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """After an update, the model holds the whole average on every rank."""
    copy = make_model(dtype)
    copy.load_state_dict(model.state_dict())
    ema = EMA(smoothing=SMOOTHING, train_with_ema_weights=True, shard_over_ranks=True)
    ema.update(copy)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.5)
    ema.update(copy)
    average = assembled(ema.state_dict(), copy)
    for name, value in copy.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, average[name].to(dtype)), f"train_with_ema_weights: {name}"


def check_update_bn(ema: EMA, model: nn.Module, dtype: torch.dtype) -> None:
    """update_bn measures the BatchNorm statistics of the average's weights (each rank on its loader) and keeps them as
    the average's; the training weights and statistics come back unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [batch(100 + i, dtype) for i in range(3)]
    ema.update_bn(loader, model)
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"update_bn changed the training model: {name}"
    reference = make_model(dtype)
    reference.load_state_dict(assembled(ema.state_dict(), model))
    measured = make_model(dtype)
    measured.load_state_dict(reference.state_dict())
    measured[1].reset_running_stats()
    measured[1].momentum = None
    measured.train()
    with torch.no_grad():
        for x in loader:
            measured(x)
    torch.testing.assert_close(reference[1].running_mean, measured[1].running_mean, msg="update_bn: running_mean")


def check_a_changed_model_is_laid_out_again(dtype: torch.dtype) -> None:
    """A reshaped parameter restarts its average (with a warning); the others' averages are carried into the new
    split (gathered to every rank: the slices move)."""
    model = make_model(dtype)
    ema = EMA(smoothing=SMOOTHING, shard_over_ranks=True)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    ema.update(model)
    before = assembled(ema.state_dict(), model)
    model[0] = nn.Linear(32, 128).to(dtype)  # reshaped: the flat layout, and every rank's slice, shift
    model[1] = nn.BatchNorm1d(128).to(dtype)
    model[3] = nn.Linear(128, 256).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema.attach(model)
    assert any("new or reshaped" in str(w.message) for w in caught), [str(w.message) for w in caught]
    after = assembled(ema.state_dict(), model)
    for name in ("5.weight", "5.bias", "3.bias"):
        assert torch.equal(after[name], before[name]), f"carried average differs: {name}"
    torch.testing.assert_close(after["0.weight"], model[0].weight.detach().float(), msg="restarted average")


def check_channels_last(rank: int) -> None:
    """Tensors whose memory order is not their logical order (channels-last convolutions) are split in memory order:
    the exports, the swap and ema_model hold the closed form in the model's own layout."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 3)).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    ema = EMA(smoothing=SECOND, shard_over_ranks=True)
    history = []
    for scale in (1.0, -0.5, 2.0):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale).add_(0.25)
        ema.update(model)
        history.append(weights(model))
    expected = closed_form(history, SECOND)
    exported = ema.ema_state_dict()
    if rank == 0:
        assert_matches(exported, expected, "channels-last export")
    assert_matches(weights(ema.ema_model), expected, "channels-last ema_model")
    with torch.no_grad(), ema.ema_weights(model):
        assert_matches(weights(model), expected, "channels-last swap")
        assert not model[0].weight.is_contiguous()  # the model keeps its layout


def check_fsdp2_refused(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    sharded = make_model()
    fully_shard(sharded)
    expect_error(
        lambda: EMA(smoothing=SMOOTHING, shard_over_ranks=True).update(sharded), "already sharded by FSDP2", "0.weight"
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
