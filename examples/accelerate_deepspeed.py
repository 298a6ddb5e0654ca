"""An EMA of the weights in a Hugging Face Accelerate loop with DeepSpeed ZeRO (``DeepSpeedPlugin``), by hand.

A small MLP fits a noisy function of 16 inputs. The pattern, in order of appearance below:

- ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))`` and ``accelerator.prepare`` as usual: the
  model comes back as a DeepSpeed engine (ZeRO-3: every parameter an empty placeholder between steps, each rank
  holding a partition). On a machine without GPUs build ``PartialState(cpu=True)`` first, as the Hugging Face
  Trainer does (``DS_ACCELERATOR=cpu``; ``Accelerator(cpu=True, ...)`` would silently drop DeepSpeed and run DDP);
- ``ema.update(model)`` once per optimizer step, when ``accelerator.sync_gradients`` is true after
  ``accelerator.accumulate``: each rank averages what it holds (under ZeRO-3 its fp32 master partitions: half the
  average's bytes on 2 ranks), with no communication;
- evaluation inside ``with ema.ema_weights(model):`` on every rank (ZeRO-3's forward gathers the average);
- a checkpoint: ``accelerator.save_state(dir)`` (DeepSpeed's own, every rank) and each rank's EMA state beside it,
  ``emakit.integrations.state_files.save_state`` (under ZeRO-3 every rank writes its own partitions;
  ``register_for_checkpointing(ema)`` would save the main process's only, which the other ranks refuse to load);
- ``ema.save_ema_weights(path)`` on every rank: gathered to rank 0, a safetensors file for the plain model.

Run it (on GPUs leave out ``DS_ACCELERATOR=cpu``)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_deepspeed.py --stage 3 --out runs/acc-z3
    # 2 micro-batches per optimizer step; saved at step 4, resumed from there to step 8
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_deepspeed.py --steps 8 --save-at 4 --out runs/a
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_deepspeed.py --steps 8 --resume --out runs/a

The first run on a machine compiles a DeepSpeed CPU op (about 30 s; set ``TORCH_EXTENSIONS_DIR`` to keep it).
``tests/test_accelerate_deepspeed.py`` runs it and checks it against the float64 closed form of the masters.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin
from torch import nn

from emakit import EMA
from emakit.integrations import state_files

HALF_LIFE = "4ba"  # in optimizer steps: each ema.update(model) below counts one


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def batch(micro_step: int, rank: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of ``rank`` at ``micro_step`` (seeded by both: a resumed run sees the same data)."""
    generator = torch.Generator().manual_seed(micro_step * 1000 + rank)
    x = torch.randn(size, 16, generator=generator)
    return x, torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.3 * torch.randn(size, 1, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module) -> float:
    x, y = batch(-1, 0, size=64)  # one held-out batch, the same on every rank
    return nn.functional.mse_loss(model(x), y).item()


def config(stage: int, accumulate: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": accumulate,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},  # a tiny model partitions
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage")
    parser.add_argument("--steps", type=int, default=8, help="train up to this optimizer step")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--save-at", type=int, default=None, help="save_state into OUT/state after this step")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state")
    parser.add_argument("--no-ema", action="store_true", help="train without an EMA (the same training otherwise)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def train(args: argparse.Namespace, after_step=None) -> tuple[Accelerator, nn.Module, EMA | None]:
    """The loop; ``after_step(model)`` (optional) runs after every optimizer step, before the EMA's update."""
    if not torch.cuda.is_available():
        PartialState(cpu=True)  # the process group (gloo) and the ranks, before the Accelerator: else each rank is 0
    plugin = DeepSpeedPlugin(hf_ds_config=config(args.stage, args.accumulate))
    accelerator = Accelerator(deepspeed_plugin=plugin)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)  # a DeepSpeed engine and its optimizer
    ema = None if args.no_ema else EMA(half_life=HALF_LIFE)
    step, micro_step, state = 0, 0, args.out / "state"
    if args.resume:
        accelerator.load_state(state)  # the engine's checkpoint: weights, optimizer
        step = int((state / "step.txt").read_text())
        micro_step = step * args.accumulate
        if ema is not None:
            state_files.load_state(ema, state, accelerator.process_index)  # this rank's own EMA state
    while step < args.steps:
        x, y = batch(micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))  # DeepSpeed steps at the boundary
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1  # an optimizer step happened
        if after_step is not None:
            after_step(model)
        if ema is not None:
            ema.update(model)  # once per optimizer step; no communication
        if step == args.save_at:
            accelerator.save_state(state)  # every rank: its ZeRO partitions
            if ema is not None:
                state_files.save_state(ema, state, accelerator.process_index, accelerator.is_main_process)
            if accelerator.is_main_process:
                (state / "step.txt").write_text(str(step))
    return accelerator, model, ema


def main(args: argparse.Namespace) -> None:
    accelerator, model, ema = train(args)
    training = evaluate(model)
    if ema is not None:
        with ema.ema_weights(model):  # every rank: ZeRO-3's forward gathers the average
            average = evaluate(model)
        accelerator.print(f"step {args.steps}: eval loss {training:.4f} training weights, {average:.4f} EMA")
        path = ema.save_ema_weights(args.out / "ema.safetensors")  # every rank calls: rank 0 writes
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            plain = make_model()  # no DeepSpeed: the exported average loads into the plain model
            plain.load_state_dict(safetensors.torch.load_file(path))
            print(f"plain model with the EMA weights: eval loss {evaluate(plain):.4f}", flush=True)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
    sys.stdout.flush()
    os._exit(0)  # everything is written; a plain exit occasionally fails a rank in gloo's teardown
