"""Run under torchrun with 2 processes (gloo, ``DS_ACCELERATOR=cpu``): ``EMATrainer`` with ``deepspeed=``, the real
Hugging Face Trainer driving a real DeepSpeed engine on CPU.

Usage: hf_deepspeed_script.py STAGE PERSISTENCE OUT_DIR

A tiny GPT-2 trains for 6 optimizer steps (each rank on its own half of the data, checkpoints and evaluations at
steps 3 and 6) three times in the same processes: ``EMATrainer(ema=EMA(half_life="4ba"))``, a plain ``Trainer``
(no EMA), and an ``EMATrainer`` resumed from the first run's ``checkpoint-3``. ``PERSISTENCE`` is ZeRO-3's
``stage3_param_persistence_threshold``: 0 partitions every parameter; 100 keeps the biases and LayerNorm weights whole
(DeepSpeed's persistent parameters, as small ones are by default: gathered anew after each swap). It checks, against
the weights DeepSpeed's optimizer steps (the fp32 masters, gathered with ``safe_get_full_fp32_param`` for the check
only):

- no ``torch.distributed`` or ``deepspeed.comm`` collective runs inside the callback's update (counted, with a
  positive control);
- the average after 6 steps equals the float64 closed form of the masters after each step;
- ``evaluate()`` sees the average and then the training weights (``eval_weights="both"``): the test compares its
  ``eval_loss`` with a plain model's (no DeepSpeed) holding the exported average, its ``eval_training_loss`` with
  a plain model's holding the masters;
- training ends bit for bit as the plain ``Trainer``'s;
- ``checkpoint-N/`` holds each rank's own state under ZeRO-3 (``emakit_ema-rank{r}.pt``, naming its partitions) and
  one ``emakit_ema.pt`` under ZeRO-2, and the run resumed from ``checkpoint-3`` ends with each rank's average and
  the weights bit for bit as the uninterrupted run's;
- ``save_ema_model(dir)`` writes a folder (ZeRO-3: gathered to rank 0) that the test loads with
  ``GPT2LMHeadModel.from_pretrained`` and compares with the closed form, which rank 0 writes to ``OUT/result.pt``
  with the final masters and the metrics; tensors the EMA does not track are gathered from the model;
- under ZeRO-3 a rank's average holds about 1/2 of the unsharded average's bytes.

Every rank prints ``rank R: ok`` at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from closed_form import ClosedForm
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed_ema_script import counting_collectives
from test_integration_transformers import make_args, make_data, make_model
from transformers import Trainer, TrainerCallback

from emakit import EMA
from emakit.integrations.transformers import EMATrainer, gathered_average

STEPS, SAVE_AT = 6, 3
SMOOTHING = 2 ** (-1 / 4)  # half_life="4ba": one update per optimizer step
EVAL_DATA = make_data(16, seed=2)
PERSISTENCE = int(sys.argv[2]) if __name__ == "__main__" else 0  # ZeRO-3's stage3_param_persistence_threshold


def config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = PERSISTENCE
    auto = "auto"  # filled in by the Trainer from its arguments
    return {
        "train_micro_batch_size_per_gpu": auto,
        "gradient_accumulation_steps": auto,
        "train_batch_size": auto,
        "zero_optimization": zero,
    }


def masters(model: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights the optimizer steps (gathered under ZeRO-3: collective; whole under ZeRO-1/2)."""
    if stage == 3:
        return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in model.named_parameters()}
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class MasterRecorder(TrainerCallback):
    """The masters after every optimizer step (before the EMA's callback, which the EMATrainer adds last)."""

    def __init__(self, stage: int) -> None:
        self.stage, self.steps = stage, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(masters(model, self.stage))


def arguments(out: Path, stage: int):
    return make_args(
        out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, eval_strategy="steps", eval_steps=SAVE_AT,
        deepspeed=config(stage), ddp_backend="gloo",
    )  # fmt: skip


def ema_trainer(out: Path, stage: int, recorder: MasterRecorder | None = None) -> tuple[EMATrainer, list[list[str]]]:
    """An EMATrainer whose EMA callback's updates are watched for collectives: the calls seen, per update."""
    trainer = EMATrainer(
        model=make_model(),
        args=arguments(out, stage),
        train_dataset=make_data(48, seed=1),
        eval_dataset=EVAL_DATA,
        callbacks=[recorder] if recorder else [],
        ema=EMA(half_life="4ba"),
        eval_weights="both",
    )
    seen: list[list[str]] = []
    update = trainer.ema_callback.on_step_end

    def counted(*args, **kwargs):
        with counting_collectives() as calls:
            update(*args, **kwargs)
        seen.append(calls)

    trainer.ema_callback.on_step_end = counted  # the instance's: the Trainer calls it by name
    return trainer, seen


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=2e-6, msg=f"{what}: {name}")


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name}"


def main(stage: int, out: Path) -> None:
    recorder = MasterRecorder(stage)
    whole, seen = ema_trainer(out / "whole", stage, recorder)
    whole.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and type(whole.model_wrapped).__name__ == "DeepSpeedEngine", type(whole.model_wrapped)
    assert whole.deepspeed.zero_optimization_stage() == stage
    parameter = whole.model.transformer.wte.weight
    assert (parameter.numel() == 0) == (stage == 3), parameter.shape  # ZeRO-3: an empty placeholder between steps
    if stage == 3:
        persistent = sorted(name for name, p in whole.model.named_parameters() if p.ds_persist)
        assert len(persistent) == (10 if PERSISTENCE else 0), persistent  # 4 biases, 3 LayerNorms' weights and biases
    ema = whole.ema

    # no collective inside an update; the counter sees one where there is one
    assert len(seen) == STEPS and all(calls == [] for calls in seen), f"the EMA's update communicated: {seen}"
    with counting_collectives() as calls:
        masters(whole.model, stage) if stage == 3 else dist.barrier()  # ZeRO-3: deepspeed.comm's all_reduce
    assert calls, "the collective counter saw nothing: it would see nothing inside the update either"

    # the average: the closed form of the masters after each step
    reference = ClosedForm(SMOOTHING)
    for weights in recorder.steps:
        reference.update(weights)
    expected = {**reference.ema, "lm_head.weight": reference.ema["transformer.wte.weight"]}  # tied
    exported = ema.ema_state_dict()  # gathered: on rank 0 only under ZeRO-3
    assert (exported != {}) == (rank == 0 or stage != 3), f"rank {rank}: {sorted(exported)[:3]}"
    if exported:
        assert_close(exported, expected, "ema_state_dict")
    if stage == 3:
        unsharded = EMA(half_life="4ba")
        unsharded.update(make_model())
        weights = ema.state_dict()["weights"]  # this rank's partitions
        held = sum(v.numel() * v.element_size() for v in weights.values())
        whole_bytes = sum(v.numel() * v.element_size() for v in unsharded.state_dict()["weights"].values())
        ratio = held / whole_bytes
        assert ratio <= 1 / world + 0.01, f"rank {rank}'s ZeRO-3 average holds {ratio:.4f} of the unsharded bytes"
        # allocated: the partitions, each view starting on a 64-byte boundary of its flat buffer
        assert held <= ema.shadow.nbytes <= held + 64 * len(weights), (ema.shadow.nbytes, held)
        assert ema.state_dict()["partitioning"] == {"engine": "deepspeed-zero3", "rank": rank, "world_size": world}
        print(f"rank {rank}: ZeRO-3 average holds {ratio:.4f} of the unsharded bytes", flush=True)

    # evaluation sees the average (every rank swaps; the forward gathers), then the training weights
    final = masters(whole.model, stage)
    metrics = whole.evaluate()
    assert metrics["eval_loss"] != metrics["eval_training_loss"], metrics
    assert_equal(masters(whole.model, stage), final, "the masters after evaluate")

    # save_ema_model: a from_pretrained folder of the closed form, gathered to rank 0
    whole.save_ema_model(out / "ema")
    untracked = EMA(smoothing=SMOOTHING, exclude="transformer.ln_f.*")  # what save_ema_model fills in from the model
    untracked.update(whole.model)
    filled = gathered_average(untracked, whole.model)
    if rank == 0:  # from_pretrained runs in the test's process: here ZeRO-3 would partition what it loads
        assert_equal({k: v for k, v in filled.items() if k != "lm_head.weight"}, final, "untracked tensors")
        torch.save({"expected": expected, "final": final, "metrics": metrics}, out / "result.pt")

    # checkpoints: each rank's own partitions under ZeRO-3, one file of the whole average otherwise
    for step in (SAVE_AT, STEPS):
        names = sorted(f.name for f in (out / "whole" / f"checkpoint-{step}").glob("emakit_ema*"))
        if stage == 3:
            assert names == ["emakit_ema-rank0.pt", "emakit_ema-rank1.pt"], names
        else:
            assert names == ["emakit_ema.pt"], names
    own = f"emakit_ema-rank{rank}.pt" if stage == 3 else "emakit_ema.pt"
    saved = torch.load(out / "whole" / f"checkpoint-{STEPS}" / own, weights_only=True)
    assert saved["partitioning"] == ema.state_dict()["partitioning"] and saved["num_updates"] == STEPS
    assert_equal(saved["weights"], ema.state_dict()["weights"], "checkpoint-6's EMA state")

    # training bit for bit as without the EMA
    plain = Trainer(
        model=make_model(), args=arguments(out / "plain", stage), train_dataset=make_data(48, seed=1),
        eval_dataset=EVAL_DATA,
    )  # fmt: skip
    plain.train()
    assert_equal(masters(plain.model, stage), final, "training without the EMA")

    # resume from checkpoint-3: each rank's average and the weights end bit for bit as the uninterrupted run's
    if rank == 0:
        shutil.copytree(out / "whole" / f"checkpoint-{SAVE_AT}", out / "resumed" / f"checkpoint-{SAVE_AT}")
    dist.barrier()
    resumed, _ = ema_trainer(out / "resumed", stage)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.ema.num_updates == STEPS
    assert_equal(masters(resumed.model, stage), final, "resumed training")
    mine, theirs = resumed.ema.state_dict(), ema.state_dict()
    assert {k: v for k, v in mine.items() if k != "weights"} == {k: v for k, v in theirs.items() if k != "weights"}
    assert_equal(mine["weights"], theirs["weights"], "resumed EMA")
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[3]))
    sys.stdout.flush()
    os._exit(0)  # everything is written: skip interpreter teardown, where a gloo thread can crash a 2-process run
