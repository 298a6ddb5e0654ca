"""Run under torchrun with 2 processes (``DS_ACCELERATOR=cpu``): ``examples/accelerate_deepspeed.py``'s loop, the
real Accelerate driving a real DeepSpeed ZeRO-3 engine on CPU.

Usage: accelerate_deepspeed_script.py OUT_DIR

The example's ``train`` runs three times in the same processes (8 optimizer steps of 2 micro-batches): with an EMA
(saving its state at step 4), without one, and resumed from the step-4 state. It checks, against the fp32 masters
DeepSpeed's optimizer steps (gathered with ``safe_get_full_fp32_param`` for the check only):

- the model really is a ZeRO-3 engine over 2 ranks (accelerate's process indices 0 and 1, empty placeholders);
- no ``torch.distributed`` or ``deepspeed.comm`` collective runs inside ``ema.update`` (counted, with a positive
  control), and there is one update per optimizer step (``accelerator.sync_gradients``), not per micro-batch;
- the average equals the float64 closed form of the masters after each optimizer step; a rank holds 1/2 of it;
- the forward inside ``ema.ema_weights(model)`` equals a plain model's holding the exported average, whose file
  (``save_ema_weights``, gathered to rank 0) loads into the plain model and equals the closed form;
- training ends bit for bit as without the EMA; the resumed run's EMA (each rank's own state file) and weights
  end bit for bit as the uninterrupted run's;
- and what ``Accelerator(cpu=True, deepspeed_plugin=...)`` really does: no DeepSpeed (``MULTI_CPU``, DDP).

Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from closed_form import ClosedForm
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed_ema_script import counting_collectives

from emakit import EMA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import accelerate_deepspeed as example

SMOOTHING = 2 ** (-1 / 4)  # the example's half_life="4ba"
STEPS, SAVE_AT = 8, 4


def masters(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights the optimizer steps (gathered: collective)."""
    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def run(out: Path, *flags: str, after_step=None):
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run, as in a new process
    args = example.parse_args(["--stage", "3", "--steps", str(STEPS), "--out", str(out), *flags])
    return example.train(args, after_step)


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name}"


def main(out: Path) -> None:
    updates: list[list[str]] = []
    update = EMA.update

    def counted(self, model, **kwargs):  # every ema.update of the example, watched for collectives
        with counting_collectives() as calls:
            result = update(self, model, **kwargs)
        updates.append(calls)
        return result

    EMA.update = counted
    history: list[dict[str, torch.Tensor]] = []
    record = lambda m: history.append(masters(m))  # noqa: E731 - the masters after each optimizer step
    accelerator, model, ema = run(out / "whole", "--save-at", str(SAVE_AT), after_step=record)
    assert ema is not None
    rank, world = dist.get_rank(), dist.get_world_size()
    assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
    assert (accelerator.num_processes, accelerator.process_index) == (2, rank), accelerator.process_index
    assert type(model).__name__ == "DeepSpeedEngine" and model.zero_optimization_stage() == 3
    assert all(p.numel() == 0 for p in model.module.parameters()), "ZeRO-3 placeholders expected"
    assert model.global_steps == STEPS == ema.num_updates == len(history), (model.global_steps, ema.num_updates)
    assert len(updates) == STEPS and all(calls == [] for calls in updates), f"ema.update communicated: {updates}"
    with counting_collectives() as calls:
        masters(model)
    assert calls, "the collective counter saw nothing: it would see nothing inside ema.update either"

    reference = ClosedForm(SMOOTHING)
    for weights in history:
        reference.update(weights)
    exported = ema.ema_state_dict()  # gathered to rank 0
    held = sum(v.numel() for v in ema.state_dict()["weights"].values())
    assert held / sum(v.numel() for v in reference.ema.values()) <= 1 / world + 0.01, held
    probe = example.batch(-1, 0, size=64)[0]
    with torch.no_grad(), ema.ema_weights(model):
        swapped = model(probe)
    path = ema.save_ema_weights(out / "ema.safetensors")
    dist.barrier()
    if rank == 0:
        for name, value in reference.ema.items():
            torch.testing.assert_close(exported[name].double(), value, rtol=1e-5, atol=2e-6, msg=name)
        plain = example.make_model()
        plain.load_state_dict(safetensors.torch.load_file(path))  # strict: every tensor, full shapes
        for name, value in reference.ema.items():
            torch.testing.assert_close(plain.state_dict()[name].double(), value, rtol=1e-5, atol=2e-6, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(swapped, plain(probe), rtol=1e-6, atol=1e-6, msg="forward inside ema_weights")
    with torch.no_grad():
        assert not torch.equal(model(probe), swapped), "the swap changed nothing: the training weights were evaluated"
    names = sorted(f.name for f in (out / "whole" / "state").glob("emakit_ema*"))
    assert names == ["emakit_ema-rank0.pt", "emakit_ema-rank1.pt"], names
    final, state = masters(model), ema.state_dict()

    _, plain_model, _ = run(out / "plain", "--no-ema")
    assert_equal(masters(plain_model), final, "training without the EMA")

    _, resumed_model, resumed = run(out / "whole", "--resume")
    assert resumed is not None and resumed.num_updates == STEPS
    assert_equal(masters(resumed_model), final, "resumed training")
    assert_equal(resumed.state_dict()["weights"], state["weights"], "resumed EMA")
    assert resumed.state_dict()["partitioning"] == {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}

    # what accelerate does with DeepSpeed when told cpu=True: drops it, silently, and wraps the model in DDP
    AcceleratorState._reset_state(reset_partial_state=True)
    fallback = Accelerator(cpu=True, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=example.config(3, 1)))
    wrapped = fallback.prepare(example.make_model())
    assert fallback.distributed_type == DistributedType.MULTI_CPU, fallback.distributed_type
    assert type(wrapped).__name__ == "DistributedDataParallel", type(wrapped)
    assert not any(hasattr(p, "ds_id") for p in wrapped.parameters())
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # everything is written: skip interpreter teardown, where a gloo thread can crash a 2-process run
