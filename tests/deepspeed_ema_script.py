"""Run under torchrun with 2 processes (gloo, ``DS_ACCELERATOR=cpu``): an EMA of a raw DeepSpeed engine, by hand.

Usage: deepspeed_ema_script.py STAGE DTYPE PERSISTENCE OUT_DIR

Each rank trains a DeepSpeed engine (ZeRO stage 1, 2 or 3; fp32 or bf16) on batches of its own and keeps
``EMA(smoothing=2 ** (-1 / 4))`` of it: started on the model before ``deepspeed.initialize`` (which re-points its
weights: the EMA follows them, then the fp32 masters the engine makes), then updated after every step through
``ema.update(engine)``. It checks:

- no collective runs inside ``ema.update`` (every ``torch.distributed`` and ``deepspeed.comm`` collective is
  counted; a positive control shows the counter sees a gather);
- the average equals the float64 closed form of the weights it follows, gathered for the check only: the fp32
  master weights under ZeRO-3 (``safe_get_full_fp32_param``), the module's (whole) weights under ZeRO-1/2;
- ``with ema.ema_weights(engine.module):`` the engine's forward equals a plain model holding the exported average;
  outside, the training weights are back, and training ends bit for bit as an engine trained without an EMA;
- ``ema.save_ema_weights(path)`` loads into the plain (unsharded) model and equals the closed form;
- an EMA resumed from a state saved mid-run (``torch.save`` / ``torch.load(weights_only=True)``) ends bit for bit
  as the uninterrupted one; under ZeRO-3 another rank's or another world size's state is refused;
- ``train_with_ema_weights=True`` sets the fp32 masters to the average, not only the module's weights;
- under ZeRO-3 a rank's average holds about 1/2 of the bytes of the unsharded average, and a model whose
  forward pass gathers something else than ``p.ds_tensor`` (hpZ's secondary partitions) is refused by name.

``PERSISTENCE`` is ``stage3_param_persistence_threshold``: 0 partitions every parameter; 100 keeps the biases whole
(DeepSpeed's persistent parameters, gathered anew after each swap). Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import collectives
import deepspeed
import deepspeed.comm
import safetensors.torch
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from emakit import EMA

SMOOTHING = 2 ** (-1 / 4)  # a half-life of 4 updates
STEPS = 6
RESUME_AT = 3  # the state saved after this many updates resumes into a second EMA


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def config(stage: int, dtype: torch.dtype, persistence: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
    }


def make_engine(stage: int, dtype: torch.dtype, persistence: int, before=None) -> deepspeed.DeepSpeedEngine:
    """The model (partitioned at construction under ZeRO-3), ``before(model)``, then the engine around it."""
    cfg = config(stage, dtype, persistence)
    with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=stage == 3):
        model = make_model()
    if before is not None:
        before(model)
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    return engine


def batch(step: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # every rank trains on its own data
    return torch.randn(4, 16, generator=generator).to(dtype)


def train_step(engine: deepspeed.DeepSpeedEngine, step: int, dtype: torch.dtype) -> None:
    loss = engine(batch(step, dtype)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


def counting_collectives() -> contextlib.AbstractContextManager[list[str]]:
    """Every call of a ``torch.distributed`` or ``deepspeed.comm`` collective inside the block, by name."""
    return collectives.counting_collectives(deepspeed.comm)


def followed_weights(engine: deepspeed.DeepSpeedEngine, stage: int) -> dict[str, torch.Tensor]:
    """The full weights the average follows, in float64 (gathered for the check only; collective under ZeRO-3)."""
    if stage == 3:  # the fp32 master weights
        return {name: safe_get_full_fp32_param(p).double() for name, p in engine.module.named_parameters()}
    return {name: p.detach().double().clone() for name, p in engine.module.named_parameters()}  # whole


def initial_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights before ``deepspeed.initialize``, in float64 (gathered under ZeRO-3: collective)."""
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.detach().double().clone() for name, p in model.named_parameters()}


def training_weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The full master and module weights (gathered: collective under ZeRO-3)."""
    params = list(engine.module.named_parameters())
    masters = {f"master {name}": safe_get_full_fp32_param(p).clone() for name, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        module = {f"module {name}": p.detach().clone() for name, p in params}
    return {**masters, **module}


def closed_form(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``ema_n = s^(n-1) w_1 + sum_{k=2..n} (1 - s) s^(n-k) w_k`` in float64: the first update starts the average."""
    n = len(history)
    return {
        name: SMOOTHING ** (n - 1) * history[0][name]
        + sum((1 - SMOOTHING) * SMOOTHING ** (n - k) * history[k - 1][name] for k in range(2, n + 1))
        for name in history[0]
    }


def assert_matches(average: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(average) == set(expected), (what, sorted(average), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(average[name].double(), value, atol=2e-6, rtol=1e-5, msg=f"{what}: {name}")


def check_refused(action, needle: str) -> None:
    try:
        action()
    except ValueError as error:
        assert needle in str(error), f"expected {needle!r} in: {error}"
    else:
        raise AssertionError(f"not refused: expected {needle!r}")


def main(stage: int, dtype_name: str, persistence: int, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ema = EMA(smoothing=SMOOTHING)
    history = []

    def start(model: nn.Module) -> None:  # the average starts before deepspeed.initialize re-points the weights
        ema.update(model)
        history.append(initial_weights(model))

    engine, twin = make_engine(stage, dtype, persistence, start), make_engine(stage, dtype, persistence)  # twin: no EMA
    if stage == 3:  # every parameter partitioned, or (PERSISTENCE 100) the biases kept whole besides
        persistent = sorted(name for name, p in engine.module.named_parameters() if p.ds_persist)
        assert persistent == (["0.bias", "2.bias", "4.bias", "4.weight"] if persistence else []), persistent
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    evaluations, resumed = [], None
    for step in range(1, STEPS + 1):
        for model in (engine, twin):
            train_step(model, step, dtype)
        with counting_collectives() as calls:
            ema.update(engine)  # the engine itself, or engine.module: the same model
        assert calls == [], f"ema.update communicated: {calls}"
        if resumed is not None:
            resumed.update(engine.module)
        history.append(followed_weights(engine, stage))
        with torch.no_grad(), ema.ema_weights(engine.module):
            evaluations.append(engine.module(probe).float())
        if step + 1 == RESUME_AT:  # the start was the first update
            buffer = io.BytesIO()
            torch.save(ema.state_dict(), buffer)
            (out / f"state-rank{rank}.pt").write_bytes(buffer.getvalue())
            state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
            resumed = EMA(smoothing=SMOOTHING)
            resumed.load_state_dict(state)  # laid out at its first update: this rank's partitions, checked there
    with counting_collectives() as calls:  # the positive control: a gather is seen
        safe_get_full_fp32_param(next(engine.module.parameters()))
    assert calls, "the collective counter saw nothing: it would see nothing inside ema.update either"

    expected = closed_form(history)
    exported = ema.ema_state_dict()  # gathered: to rank 0 under ZeRO-3 (an empty dict elsewhere), everywhere else
    if stage == 3:
        assert (exported != {}) == (rank == 0), f"rank {rank}: ZeRO-3 exports gather to rank 0 only"
    if exported:
        assert_matches(exported, expected, "ema_state_dict")
    path = ema.save_ema_weights(out / "ema.safetensors")
    dist.barrier()
    if rank == 0:
        plain = make_model()
        plain.load_state_dict(safetensors.torch.load_file(path))  # strict: every tensor, full shapes
        assert_matches(dict(plain.named_parameters()), expected, "save_ema_weights")

    # evaluation inside ema_weights saw the average: the last one against a plain model holding it
    if rank == 0:
        reference = make_model().to(dtype)
        reference.load_state_dict(exported)  # cast to the model's dtype, as the swap casts
        with torch.no_grad():
            torch.testing.assert_close(evaluations[-1], reference(probe).float(), msg="forward inside ema_weights")

    # training bit for bit as without the EMA (master and module weights)
    mine, theirs = training_weights(engine), training_weights(twin)
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), f"training with the EMA differs from without it: {name}"

    # resume: the EMA loaded from the state saved after RESUME_AT updates ends bit for bit as the uninterrupted one
    for name, value in ema.state_dict()["weights"].items():
        assert torch.equal(resumed.state_dict()["weights"][name], value), f"resumed EMA differs: {name}"

    if stage == 3:
        check_zero3_sharding(ema, engine, out, rank, world)
    check_train_with_ema_weights(twin, dtype)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def check_train_with_ema_weights(engine: deepspeed.DeepSpeedEngine, dtype: torch.dtype) -> None:
    """``train_with_ema_weights=True`` puts the average into the fp32 masters the optimizer steps (ZeRO-3's partitions,
    ZeRO-1/2's fragments), not only into the module: the next step starts from it."""
    ema = EMA(smoothing=SMOOTHING, train_with_ema_weights=True)
    ema.update(engine)
    train_step(engine, STEPS + 1, dtype)
    ema.update(engine)  # the training weights become the average
    average = ema.ema_state_dict()  # rank 0 only under ZeRO-3
    weights = training_weights(engine)
    for name, value in average.items():
        assert torch.equal(weights[f"master {name}"], value), f"train_with_ema_weights: master {name}"
        assert torch.equal(weights[f"module {name}"], value.to(dtype)), f"train_with_ema_weights: module {name}"


def check_zero3_sharding(ema: EMA, engine: deepspeed.DeepSpeedEngine, out: Path, rank: int, world: int) -> None:
    """Each rank's average holds its partitions (about 1/world of the bytes); states load on their own rank only."""
    whole = EMA(smoothing=SMOOTHING)
    whole.update(make_model())  # the unsharded average of the same model
    ratio = ema.shadow.nbytes / whole.shadow.nbytes
    assert ratio < 1 / world + 0.05, f"rank {rank}'s ZeRO-3 average holds {ratio:.3f} of the unsharded one's bytes"
    state = ema.state_dict()
    assert state["partitioning"] == {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}
    dist.barrier()  # every rank wrote its state at RESUME_AT
    other = torch.load(out / f"state-rank{1 - rank}.pt", weights_only=True)
    late = EMA(smoothing=SMOOTHING)
    late.load_state_dict(other)  # not laid out yet: checked at the first update
    check_refused(lambda: late.update(engine), f"partitions of rank {1 - rank} of {world}, but this model has")
    attached = EMA(smoothing=SMOOTHING)
    attached.update(engine)
    check_refused(lambda: attached.load_state_dict(other), f"partitions of rank {1 - rank} of {world}")
    bigger = {**state, "partitioning": {**state["partitioning"], "world_size": 4}}
    check_refused(lambda: attached.load_state_dict(bigger), f"rank {rank} of 4, but this model has")
    hpz = {**config(3, torch.float32, 0), "zero_optimization": {"stage": 3, "zero_hpz_partition_size": world}}
    with deepspeed.zero.Init(config_dict_or_path=hpz):  # hpZ: the forward gathers a secondary partition
        secondary = make_model()
    check_refused(lambda: EMA(smoothing=SMOOTHING).update(secondary), "'0.weight' is a DeepSpeed ZeRO-3 parameter")
    check_refused(lambda: EMA(smoothing=SMOOTHING).update(secondary), "secondary partition (hpZ")
    print(f"rank {rank}: ZeRO-3 average holds {ratio:.3f} of the unsharded bytes", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    sys.stdout.flush()
    os._exit(0)
