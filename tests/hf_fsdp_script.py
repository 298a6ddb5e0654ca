"""Run under torchrun with 2 processes: ``EMATrainer`` with the Hugging Face Trainer's ``fsdp=``, and what it really
ran.

Usage: hf_fsdp_script.py VERSION OUT_DIR

On CPU (``use_cpu=True``, gloo) the Trainer does not shard: with ``fsdp_version=2`` accelerate enables FSDP only for
GPU-like devices, so the run is DDP (``is_fsdp_enabled`` False, ``MULTI_CPU``, a ``DistributedDataParallel`` model of
whole parameters) and the EMA is the DDP one, every rank holding the same whole average; with ``fsdp_version=1``
(``sync_module_states=True``, transformers' default) building the Trainer raises. Both are asserted as they are.

On CUDA (nccl; ``tests/gpu/test_hf_fsdp2.py``) ``fsdp_version=2`` really shards: the parameters are DTensors, the
EMA averages each rank's shards and each rank writes its own state into ``checkpoint-4/``; the average after 4 steps
equals the float64 closed form of the full weights (gathered for the check only), evaluation sees the average, and
``save_ema_model`` gathers it into a folder the test loads with ``from_pretrained``. Every rank prints ``rank R: ok``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from closed_form import ClosedForm
from test_integration_transformers import make_args, make_data, make_model
from transformers import TrainerCallback

from emakit import EMA
from emakit.integrations.transformers import EMATrainer

STEPS = 4
SMOOTHING = 2 ** (-1 / 4)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (DTensors gathered: collective), on the CPU."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
        for name, p in model.named_parameters()
    }


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(full_weights(model))


def main(version: int, out: Path) -> None:
    cuda = torch.cuda.is_available()
    args = make_args(
        out, max_steps=STEPS, fsdp="full_shard", fsdp_config={"fsdp_version": version}, save_strategy="steps",
        save_steps=STEPS,
        ddp_backend="nccl" if cuda else "gloo", use_cpu=not cuda,
    )  # fmt: skip
    rank = dist.get_rank()
    kwargs = dict(train_dataset=make_data(32, seed=1), eval_dataset=make_data(16, seed=2), eval_weights="both")
    if version == 1 and not cuda:
        try:
            EMATrainer(model=make_model(), args=args, ema=EMA(half_life="4ba"), **kwargs)
        except RuntimeError as error:
            assert "sync_module_states=True` is not supported on cpu" in str(error), error
        else:
            raise AssertionError("FSDP1 on CPU was expected to be refused by accelerate")
        print(f"rank {rank}: ok", flush=True)
        return
    recorder = Recorder()
    trainer = EMATrainer(model=make_model(), args=args, ema=EMA(half_life="4ba"), callbacks=[recorder], **kwargs)
    trainer.train()
    parameter = next(trainer.model.parameters())
    if cuda:  # real FSDP2: DTensor shards, averaged where they live
        assert trainer.is_fsdp_enabled, "FSDP was expected on CUDA"
        assert type(parameter).__name__ == "DTensor", type(parameter)
        names = sorted(f.name for f in (out / f"checkpoint-{STEPS}").glob("emakit_ema*"))
        assert names == ["emakit_ema-rank0.pt", "emakit_ema-rank1.pt"], names  # each rank's own shards
    else:  # what really ran: DDP, whole parameters, every rank the same whole average
        assert not trainer.is_fsdp_enabled
        assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
        assert type(parameter) is torch.nn.Parameter and trainer.args.world_size == 2
        assert sorted(f.name for f in (out / f"checkpoint-{STEPS}").glob("emakit_ema*")) == ["emakit_ema.pt"]
    reference = ClosedForm(SMOOTHING)
    for weights in recorder.steps:
        reference.update(weights)
    average = trainer.ema.ema_state_dict()  # gathered on every rank (DTensors) or whole already
    assert trainer.ema.num_updates == STEPS
    for name, value in reference.ema.items():
        torch.testing.assert_close(average[name].double().cpu(), value, rtol=1e-5, atol=2e-6, msg=name)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] != metrics["eval_training_loss"], metrics
    trainer.save_ema_model(out / "ema")
    if rank == 0:
        torch.save({"expected": reference.ema, "metrics": metrics}, out / "result.pt")
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # everything is written: skip interpreter teardown, where a gloo thread can crash a 2-process run
