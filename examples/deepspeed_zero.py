"""An EMA of the weights of a DeepSpeed engine (ZeRO stage 1, 2 or 3), by hand.

A small MLP fits a noisy function of 16 inputs. The pattern, in order of appearance below:

- under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (partitioned at construction), then
  ``deepspeed.initialize`` as usual; the EMA needs nothing from DeepSpeed;
- ``ema.update(engine)`` once per optimizer step: with gradient accumulation ``engine.step()`` runs every
  micro-batch and steps the optimizer at the boundary only (``engine.is_gradient_accumulation_boundary()`` before
  it says so). Each rank averages what it holds of each parameter (under ZeRO-3 its fp32 master partitions: half
  the average's bytes on 2 ranks), with no communication;
- evaluation inside ``with ema.ema_weights(engine.module):`` on every rank (ZeRO-3's forward gathers the
  parameters, now holding the average); the training weights come back bit for bit on exit;
- a checkpoint: ``engine.save_checkpoint`` and, beside it, each rank's ``ema.state_dict()`` (under ZeRO-3 its own
  partitions: it resumes on the same number of processes);
- ``ema.save_ema_weights(path)`` on every rank: the average gathered to rank 0, which writes a safetensors file
  that loads into the plain model.

Run it (on CPU; on GPUs leave out ``DS_ACCELERATOR=cpu``)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --stage 3 --out runs/zero3
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --stage 2 --bf16 --out runs/zero2

    # 2 micro-batches per optimizer step; interrupted after 20 steps, resumed from the checkpoint to 40
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --accumulate 2 --steps 20 --out runs/a
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --accumulate 2 --steps 40 --resume \
        --out runs/a

The first run on a machine compiles a DeepSpeed CPU op (about 30 s; set ``TORCH_EXTENSIONS_DIR`` to keep it).
``tests/test_deepspeed_ema.py`` runs this script and checks that the resumed run ends as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import deepspeed
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from emakit import EMA

HALF_LIFE = "10ba"  # in optimizer steps: each ema.update(engine) below counts one
EVAL_EVERY = 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def batch(micro_step: int, dtype: torch.dtype, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of this rank at ``micro_step`` (seeded by both: a resumed run sees the same data)."""
    generator = torch.Generator().manual_seed(micro_step * 1000 + dist.get_rank())
    x = torch.randn(size, 16, generator=generator)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.3 * torch.randn(size, 1, generator=generator)
    return x.to(dtype), y


@torch.no_grad()
def evaluate(model: nn.Module, dtype: torch.dtype) -> float:
    x, y = batch(-1, dtype, size=256)  # one held-out batch (micro-step -1 is never trained on)
    return nn.functional.mse_loss(model(x).float(), y).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (fp32 master weights, fp32 average)")
    parser.add_argument("--steps", type=int, default=40, help="train up to this optimizer step")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else "nccl")
    rank, dtype = dist.get_rank(), torch.bfloat16 if args.bf16 else torch.float32
    config = {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": args.accumulate,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.bf16},
    }
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=args.stage == 3):
        model = make_model()
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())

    ema = EMA(half_life=HALF_LIFE)
    checkpoint, micro_step = args.out / "checkpoint", 0
    if args.resume:
        _, client_state = engine.load_checkpoint(checkpoint)
        micro_step = client_state["micro_step"]
        ema.load_state_dict(torch.load(checkpoint / f"ema-rank{rank}.pt", weights_only=True))  # this rank's

    while engine.global_steps < args.steps:
        x, y = batch(micro_step, dtype)
        micro_step += 1
        engine.backward(nn.functional.mse_loss(engine(x).float(), y))
        stepping = engine.is_gradient_accumulation_boundary()  # this engine.step() steps the optimizer
        engine.step()
        if not stepping:
            continue
        ema.update(engine)  # once per optimizer step; no communication
        step = engine.global_steps
        if step % EVAL_EVERY == 0:
            training = evaluate(engine.module, dtype)
            with ema.ema_weights(engine.module):  # every rank: ZeRO-3's forward gathers the average
                average = evaluate(engine.module, dtype)
            if rank == 0:
                print(f"step {step}: eval loss {training:.4f} training weights, {average:.4f} EMA", flush=True)

    step = engine.global_steps
    engine.save_checkpoint(checkpoint, client_state={"micro_step": micro_step})  # every rank: its ZeRO partitions
    torch.save(ema.state_dict(), checkpoint / f"ema-rank{rank}.pt")  # every rank: its EMA (partitions)
    path = ema.save_ema_weights(args.out / "ema.safetensors")  # every rank calls: gathered to rank 0, written
    dist.barrier()
    if rank == 0:
        plain = make_model()  # no DeepSpeed: the exported average loads into the plain model
        plain.load_state_dict(safetensors.torch.load_file(path))
        print(f"step {step}: plain model with the EMA weights: eval loss {evaluate(plain, torch.float32):.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # everything is written; a plain exit occasionally fails a rank in gloo's teardown
