"""Run under torchrun (2 CPU processes, gloo): the Hugging Face ``EMATrainer`` under DDP with
``EMA(shard_over_ranks=True)``. Checks on every rank: the whole average (assembled from every rank's state, for the
check only) equals the float64 closed form of the recorded steps; evaluation of both weights gives the same metrics
on both ranks, the average's differing from the training weights'; ``save_ema_model`` writes a ``from_pretrained``
folder (rank 0) holding the closed form. Prints ``rank R: ok``.

Checkpoints: every rank writes its own slice into ``checkpoint-3/`` (``emakit_ema-rank{r}.pt``: the state is per
rank, ``ema.state_is_per_rank``), and a run resumed from it ends with every rank's slice bit for bit as the
uninterrupted run's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_integration_transformers import SMOOTHING_4BA, Recorder, closed_form, make_args, make_data, make_model
from transformers import GPT2LMHeadModel

from emakit import EMA
from emakit.integrations.transformers import EMATrainer


def main() -> None:
    out = sys.argv[1]
    recorder, ema = Recorder(), EMA(half_life="4ba", shard_over_ranks=True)
    trainer = EMATrainer(
        model=make_model(),
        args=make_args(out, max_steps=6, save_strategy="steps", save_steps=3, ddp_backend="gloo"),
        train_dataset=make_data(48, seed=1),
        eval_dataset=make_data(16, seed=2),
        callbacks=[recorder],
        ema=ema,
        eval_weights="both",
    )
    trainer.train()
    assert trainer.args.world_size == 2 and type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    rank = dist.get_rank()
    assert ema.state_is_per_rank
    state = ema.state_dict()
    assert state["partitioning"]["rank"] == rank and state["partitioning"]["world_size"] == 2
    expected = closed_form(recorder.steps, SMOOTHING_4BA)
    pieces: list = [None, None]
    dist.all_gather_object(pieces, state["weights"])
    shapes = dict(trainer.model.named_parameters())
    for name, value in state["weights"].items():
        if name in shapes:
            value = torch.cat([p[name] for p in pieces]).view(shapes[name].shape)
        torch.testing.assert_close(value.double(), expected[name], atol=1e-6, rtol=1e-5, msg=name)
    metrics = trainer.evaluate()
    both: list = [None, None]
    dist.all_gather_object(both, metrics)
    assert both[0]["eval_loss"] == both[1]["eval_loss"] and both[0]["eval_loss"] != both[0]["eval_training_loss"]
    trainer.save_ema_model(f"{out}/ema")  # the average swapped in (every rank), rank 0 writes
    dist.barrier()
    if rank == 0:
        loaded = GPT2LMHeadModel.from_pretrained(f"{out}/ema")
        for name, value in loaded.state_dict().items():
            if name in expected:
                torch.testing.assert_close(value.double(), expected[name], atol=1e-6, rtol=1e-5, msg=f"saved {name}")
    # each rank's slice in checkpoint-3/, resumed bit for bit
    assert sorted(p.name for p in Path(out, "checkpoint-3").glob("emakit_ema*")) == [
        "emakit_ema-rank0.pt",
        "emakit_ema-rank1.pt",
    ]
    resumed = EMA(half_life="4ba", shard_over_ranks=True)
    again = EMATrainer(
        model=make_model(),
        args=make_args(f"{out}/resumed", max_steps=6, save_strategy="no", ddp_backend="gloo"),
        train_dataset=make_data(48, seed=1),
        ema=resumed,
    )
    again.train(resume_from_checkpoint=f"{out}/checkpoint-3")
    final = resumed.state_dict()
    assert final["num_updates"] == state["num_updates"] == 6
    for name, value in state["weights"].items():
        assert torch.equal(final["weights"][name], value), f"rank {rank}: resumed slice of {name} differs"
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
