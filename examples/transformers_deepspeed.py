"""An EMA of the weights with the Hugging Face ``Trainer`` and DeepSpeed ZeRO (``TrainingArguments(deepspeed=...)``).

A tiny GPT-2 learns random token sequences; ``EMATrainer`` keeps the average. Under ZeRO-3 each process averages its
own partitions of the fp32 master weights (no communication per update), every evaluation measures the average
(``eval_loss``) and the training weights (``eval_training_loss``), each process writes its own EMA state into
``checkpoint-N/`` (``emakit_ema-rank{r}.pt``), and ``save_ema_model`` gathers the average into a ``from_pretrained``
folder. Run it (on GPUs leave out ``DS_ACCELERATOR=cpu`` and ``--cpu``)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/transformers_deepspeed.py --cpu --out runs/hf-z3
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/transformers_deepspeed.py --cpu --stage 2 --out runs/hf-z2
    # resumed from the checkpoint written at step 10: weights and each process's average
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/transformers_deepspeed.py --cpu --resume --out runs/hf-z3

Load the exported folder in a process without a ZeRO-3 ``TrainingArguments`` alive (the Hugging Face integration
partitions what ``from_pretrained`` loads while one is): ``GPT2LMHeadModel.from_pretrained("runs/hf-z3/ema")``.
The first run on a machine compiles a DeepSpeed CPU op (about 30 s; set ``TORCH_EXTENSIONS_DIR`` to keep it).
``tests/test_hf_deepspeed.py`` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from emakit import EMA
from emakit.integrations.transformers import EMATrainer


def data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",  # the Trainer fills these in from its arguments
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},  # a tiny model partitions
    }
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=3e-2, eval_strategy="steps", eval_steps=10, save_steps=10, logging_strategy="no",
        report_to=[], disable_tqdm=True, deepspeed=deepspeed, use_cpu=args.cpu,
        ddp_backend="gloo" if args.cpu else None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    trainer = EMATrainer(
        model=model, args=training, train_dataset=data(160, seed=1), eval_dataset=data(16, seed=2),
        ema=EMA(half_life="5ba"),  # in optimizer steps
        eval_weights="both",  # eval_loss: the average; eval_training_loss: the training weights
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if args.resume else None)  # every process restores its own average
    metrics = trainer.evaluate()  # every process swaps its partitions in; the forward gathers them
    trainer.save_ema_model(args.out / "ema")  # every process calls: gathered to the main process, which writes
    if trainer.is_world_process_zero():
        print(f"step {trainer.state.global_step}: eval_loss (EMA) {metrics['eval_loss']:.6f}, "
              f"eval_training_loss {metrics['eval_training_loss']:.6f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # everything is written; a plain exit occasionally fails a rank in gloo's teardown
