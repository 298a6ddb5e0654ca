"""Run under torchrun with 2 processes (gloo, CPU): an EMA of a torch FSDP1 model (``FullyShardedDataParallel``)
by hand.

Usage: fsdp1_ema_script.py USE_ORIG_PARAMS OUT_DIR      (USE_ORIG_PARAMS: "true" or "false")

Each rank trains an MLP (a BatchNorm among its layers) wrapped by FSDP1 (``device_id=cpu``, each Linear its own unit,
the rest in the root unit) on batches of its own and keeps ``EMA(smoothing=2 ** (-1 / 4))`` of it, updated after
every optimizer step through ``ema.update(model)`` (started, and swapped in and out, before the model's first forward
pass: before FSDP's lazy initialisation). It checks:

- no collective runs inside ``ema.update``, the first one (the layout) included (every ``torch.distributed``
  collective is counted; a positive control shows the counter sees the export's gathers);
- the exported average (``ema.ema_state_dict()``, rank 0; empty elsewhere) equals the float64 closed form of the
  full weights, gathered for the check only with ``FSDP.summon_full_params`` (buffers: rank 0's own, which FSDP1
  neither shards nor synchronises);
- ``with ema.ema_weights(model):`` the FSDP forward equals a plain model holding the exported average; outside,
  training ends bit for bit as a twin trained without an EMA;
- ``ema.save_ema_weights(path)`` loads into the plain model (strict) and equals the closed form;
- an EMA resumed from a state saved mid-run (``torch.save`` / ``torch.load(weights_only=True)``) ends bit for bit
  as the uninterrupted one; another rank's or another world size's state is refused, naming both;
- each rank's average holds about 1/2 of the bytes of the unsharded average;
- ``train_with_ema_weights=True`` puts the average into this rank's shards;
- refused, by message: an update or a swap while FSDP has the model unsharded (``summon_full_params``), the
  model's ``.module`` instead of the FSDP root, ``ema_model``;
- the other sharding modes (``SHARD_GRAD_OP``, ``NO_SHARD``, ``HYBRID_SHARD`` on a 2x1 and a 1x2 mesh, parameter
  mixed precision): the exported average equals the closed form and a swapped-in forward the plain model's.

Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from collectives import counting_collectives
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from emakit import EMA

SMOOTHING = 2 ** (-1 / 4)  # a half-life of 4 updates
STEPS = 6
RESUME_AT = 3  # the state saved after this many updates resumes into a second EMA


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )  # fmt: skip


def wrap(orig: bool, **options) -> FSDP:
    """The model in FSDP1 units: each Linear its own, the BatchNorm in the root's (as many users wrap)."""
    policy = ModuleWrapPolicy({nn.Linear})
    return FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=orig, auto_wrap_policy=policy, **options)


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # every rank trains on its own data
    return torch.randn(8, 16, generator=generator)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    model(batch(step)).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def full_weights(model: FSDP) -> dict[str, torch.Tensor]:
    """The full parameters (gathered with ``summon_full_params``: collective) and this rank's buffers, float64."""
    with FSDP.summon_full_params(model, writeback=False):
        weights = {clean(n): p.detach().double().clone() for n, p in model.named_parameters()}
    weights.update({clean(n): b.clone() for n, b in model.named_buffers()})
    return {n: w.double() if w.is_floating_point() else w for n, w in weights.items()}


def closed_form(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``ema_n = s^(n-1) w_1 + sum_{k=2..n} (1 - s) s^(n-k) w_k`` in float64 (integer buffers: copied, the last)."""
    n = len(history)
    return {
        name: SMOOTHING ** (n - 1) * history[0][name]
        + sum((1 - SMOOTHING) * SMOOTHING ** (n - k) * history[k - 1][name] for k in range(2, n + 1))
        if history[-1][name].is_floating_point()
        else history[-1][name]
        for name in history[0]
    }


def assert_matches(average: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(average) == set(expected), (what, sorted(average), sorted(expected))
    for name, value in expected.items():
        got = average[name].double() if value.is_floating_point() else average[name]
        torch.testing.assert_close(got, value, atol=2e-6, rtol=1e-5, msg=f"{what}: {name}")


def check_refused(action, needle: str) -> None:
    try:
        action()
    except ValueError as error:
        assert needle in str(error), f"expected {needle!r} in: {error}"
    else:
        raise AssertionError(f"not refused: expected {needle!r}")


def local_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards (parameters as FSDP holds them between steps) and buffers."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def main(orig: bool, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, twin = wrap(orig), wrap(orig)  # twin: trained without an EMA
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin)]
    if orig:  # some original parameters lie wholly in the other rank's shard: empty here, and averaged as such
        assert any(p.numel() == 0 for p in model.parameters()), [tuple(p.shape) for p in model.parameters()]
    else:
        assert all(n.endswith("_flat_param") for n, _ in model.named_parameters())
    ema = EMA(smoothing=SMOOTHING)
    probe = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    with counting_collectives() as calls:  # laid out from FSDP's metadata: the wrapper's state_dict() would gather
        ema.update(model)  # the average starts before FSDP's lazy initialisation (its first forward pass)
    assert calls == [], f"the first ema.update communicated: {calls}"
    with ema.ema_weights(model):
        pass
    history, evaluations, resumed = [full_weights(model)], [], None
    full_weights(twin)
    for step in range(1, STEPS + 1):
        for m, optimizer in zip((model, twin), optimizers):
            train_step(m, optimizer, step)
        with counting_collectives() as calls:
            ema.update(model)
        assert calls == [], f"ema.update communicated: {calls}"
        if resumed is not None:
            resumed.update(model)
        history.append(full_weights(model))
        with torch.no_grad(), ema.ema_weights(model):
            model.eval()
            evaluations.append(model(probe))
            model.train()
        full_weights(twin)  # the twin runs the loop's other work too: the same gathers, an evaluation
        with torch.no_grad():
            twin.eval()
            twin(probe)
            twin.train()
        if step == RESUME_AT:
            buffer = io.BytesIO()
            torch.save(ema.state_dict(), buffer)
            (out / f"state-rank{rank}.pt").write_bytes(buffer.getvalue())
            resumed = EMA(smoothing=SMOOTHING)
            resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))

    with counting_collectives() as calls:  # the positive control: the export's gathers are seen
        exported = ema.ema_state_dict()
    assert calls and set(calls) == {"gather"}, f"the collective counter saw {calls} around an export"
    assert (exported != {}) == (rank == 0), f"rank {rank}: FSDP1 exports gather to rank 0 only"
    expected = closed_form(history)
    if rank == 0:
        assert_matches(exported, expected, "ema_state_dict")
    path = ema.save_ema_weights(out / "ema.safetensors")
    dist.barrier()
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(safetensors.torch.load_file(path))  # strict: every tensor, full shapes
        assert_matches(plain.state_dict(), expected, "save_ema_weights")
        plain.eval()
        with torch.no_grad():  # the last evaluation inside ema_weights saw the average
            torch.testing.assert_close(evaluations[-1], plain(probe), msg="forward inside ema_weights")

    mine, theirs = local_tensors(model), local_tensors(twin)  # training bit for bit as without the EMA
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), f"training with the EMA differs from without it: {name}"
    for name, value in ema.state_dict()["weights"].items():  # resumed mid-run: bit for bit
        assert torch.equal(resumed.state_dict()["weights"][name], value), f"resumed EMA differs: {name}"

    check_sharding(ema, model, out, rank, world)
    check_train_with_ema_weights(twin, optimizers[1])
    check_refusals(ema, model)
    for name, options in modes().items():
        check_mode(orig, name, options, probe, rank)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def check_sharding(ema: EMA, model: FSDP, out: Path, rank: int, world: int) -> None:
    """Each rank's average holds its shards (about 1/world of the bytes); states load on their own rank only."""
    whole = EMA(smoothing=SMOOTHING)
    whole.update(make_model())  # the unsharded average of the same model

    def parameter_bytes(average: EMA) -> int:  # FSDP1 shards parameters; buffers stay whole on every rank
        return sum(group.nbytes for group in average.shadow._groups if group.kind == "parameters")

    ratio = parameter_bytes(ema) / parameter_bytes(whole)
    assert ratio <= 1 / world + 0.01, f"rank {rank}'s FSDP1 average holds {ratio:.4f} of the unsharded one's bytes"
    overall = ema.shadow.nbytes / whole.shadow.nbytes
    state = ema.state_dict()
    assert state["partitioning"] == {"engine": "fsdp1", "rank": rank, "world_size": world}, state["partitioning"]
    dist.barrier()  # every rank wrote its state at RESUME_AT
    other = torch.load(out / f"state-rank{1 - rank}.pt", weights_only=True)
    late = EMA(smoothing=SMOOTHING)
    late.load_state_dict(other)  # not laid out yet: checked at the first update
    check_refused(lambda: late.update(model), f"flat shards of rank {1 - rank} of {world}, but this model has")
    attached = EMA(smoothing=SMOOTHING)
    attached.update(model)
    check_refused(lambda: attached.load_state_dict(other), f"flat shards of rank {1 - rank} of {world}")
    bigger = {**state, "partitioning": {**state["partitioning"], "world_size": 4}}
    check_refused(lambda: attached.load_state_dict(bigger), f"rank {rank} of 4, but this model has")
    print(
        f"rank {rank}: FSDP1 average holds {ratio:.4f} of the parameters' unsharded bytes, {overall:.4f} of all",
        flush=True,
    )


def check_train_with_ema_weights(model: FSDP, optimizer: torch.optim.Optimizer) -> None:
    """``train_with_ema_weights=True`` writes the average into this rank's shards: the next step starts from it."""
    ema = EMA(smoothing=SMOOTHING, train_with_ema_weights=True)
    ema.update(model)
    train_step(model, optimizer, STEPS + 1)
    ema.update(model)
    weights = ema.state_dict()["weights"]
    for name, p in model.named_parameters():
        shard = p.detach().narrow(0, 0, weights[name].numel())  # a FlatParameter's padding is not averaged
        assert torch.equal(shard, weights[name]), f"train_with_ema_weights: {name}"


def check_refusals(ema: EMA, model: FSDP) -> None:
    with FSDP.summon_full_params(model, writeback=False):  # the module holds the full parameters
        check_refused(lambda: ema.update(model), "that FSDP has unsharded now (inside its forward")
        check_refused(lambda: ema.ema_weights(model).__enter__(), "FSDP has unsharded now")
    training = local_tensors(model)
    block = ema.ema_weights(model)
    block.__enter__()
    with FSDP.summon_full_params(model):  # writes the full parameters back into the shards on exit
        try:  # leaving the swap here would restore the shards, then the summon would overwrite them
            block.__exit__(None, None, None)
        except (ValueError, RuntimeError) as error:
            print(f"rank {dist.get_rank()}: swap left inside summon_full_params: {error}", flush=True)
        else:
            raise AssertionError("a swap left inside summon_full_params was not refused")
    ema.get_training_model(model)  # outside: the training weights come back bit for bit
    assert all(torch.equal(training[n], t) for n, t in local_tensors(model).items()), "training weights not back"
    check_refused(lambda: EMA(smoothing=SMOOTHING).update(model.module), "pass the FSDP-wrapped model itself")
    check_refused(lambda: ema.ema_model, "ema_model of a model sharded by fsdp1 is not made")
    check_refused(lambda: EMA(smoothing=SMOOTHING, shard_over_ranks=True).update(model), "sharded by FSDP1 (a flat")
    with counting_collectives() as calls:  # the refusals left the EMA as it was: it updates on, silently
        ema.update(model)
    assert calls == [], calls


def modes() -> dict[str, dict]:
    hybrid = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD}
    return {
        "SHARD_GRAD_OP": {"sharding_strategy": ShardingStrategy.SHARD_GRAD_OP},
        "NO_SHARD": {"sharding_strategy": ShardingStrategy.NO_SHARD},
        "HYBRID_SHARD 2x1": {**hybrid, "device_mesh": init_device_mesh("cpu", (2, 1), mesh_dim_names=("r", "s"))},
        "HYBRID_SHARD 1x2": {**hybrid, "device_mesh": init_device_mesh("cpu", (1, 2), mesh_dim_names=("r", "s"))},
        "mixed precision": {"mixed_precision": MixedPrecision(param_dtype=torch.bfloat16)},
    }


def check_mode(orig: bool, name: str, options: dict, probe: torch.Tensor, rank: int) -> None:
    """Three steps in another sharding mode: the export equals the closed form, a swapped-in forward the plain
    model holding it (rank 0's; under HYBRID_SHARD 2x1 every rank holds whole shards and gathers to itself)."""
    model = wrap(orig, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema, history = EMA(smoothing=SMOOTHING), []
    for step in range(1, 4):
        train_step(model, optimizer, step)
        with counting_collectives() as calls:
            ema.update(model)
        assert calls == [], f"{name}: ema.update communicated: {calls}"
        history.append(full_weights(model))
    with torch.no_grad(), ema.ema_weights(model):
        model.eval()
        seen = model(probe).float()
        model.train()
        swapped = full_weights(model)  # what FSDP gathers from the swapped-in shards (collective)
    exported = ema.ema_state_dict()
    if rank == 0:
        assert_matches(exported, closed_form(history), name)
        for key, value in exported.items():
            assert torch.equal(swapped[key], value.double()), f"{name}: swapped-in {key} is not the average"
        plain = make_model()
        plain.load_state_dict(exported)
        plain.eval()
        if "mixed" not in name:  # (under bf16 compute the forward differs from the plain model's by rounding)
            with torch.no_grad():
                torch.testing.assert_close(seen, plain(probe), msg=f"{name}: forward inside ema_weights")
    print(f"rank {rank}: {name}: {ema.state_dict()['partitioning']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] == "true", Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)  # DTensor's caches keep the meshes alive past destroy_process_group (see sharded_ema_script.py)
