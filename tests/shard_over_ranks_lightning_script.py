"""Run under torchrun (2 CPU processes): Lightning DDP with ``EMACallback(shard_over_ranks=True)``.

Three fits in one process group: 2 epochs at once; 1 epoch then a checkpoint (written by rank 0, holding every
rank's slice); 2 epochs resumed from it. Checks on every rank: the whole average (assembled from every rank's state,
for the check only) equals the float64 closed form of the recorded optimizer steps; each rank's slice after the
resumed run equals the uninterrupted one bit for bit; ``ema_model`` (gathered to every rank) holds the average;
validation inside the fit ran with the average (the module's logged validation loss equals the loss of a plain
module holding it). Prints ``rank R: ok``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_integration_lightning import StepRecorder, TinyModule, loader, make_trainer

from emakit import EMA
from emakit.integrations.lightning import EMACallback

SMOOTHING = 0.8


def fit(out: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[EMACallback, StepRecorder, object]:
    recorder, callback = StepRecorder(), EMACallback(ema=EMA(smoothing=SMOOTHING, shard_over_ranks=True))
    trainer = make_trainer(out, [recorder, callback], devices=2, strategy="ddp", max_epochs=epochs)
    module = TinyModule(batchnorm=False)
    trainer.fit(module, loader(1, n=96), loader(2, n=32), ckpt_path=ckpt_path)
    return callback, recorder, trainer


def closed_form(steps: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    average = None
    for step in sorted(steps):
        w = steps[step]
        average = dict(w) if average is None else {k: SMOOTHING * average[k] + (1 - SMOOTHING) * w[k] for k in w}
    assert average is not None
    return average


def assembled(state: dict) -> dict[str, torch.Tensor]:
    """The whole average from every rank's pieces, laid end to end in rank order (collective; for the check only)."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state["weights"])
    return {name: torch.cat([s[name] for s in states]) for name in state["weights"]}


def main(out: Path) -> None:
    whole, recorder, trainer = fit(out / "whole", 2)
    rank = trainer.global_rank
    assert whole.ema.state_is_per_rank
    state = whole.ema.state_dict()
    assert state["partitioning"]["rank"] == rank and state["partitioning"]["world_size"] == 2, state["partitioning"]
    expected = closed_form(recorder.steps)
    average = assembled(state)
    for name, value in expected.items():
        torch.testing.assert_close(average[name].double(), value.reshape(-1), msg=f"closed form: {name}")
    for name, value in whole.ema_model.state_dict().items():  # gathered to every rank
        torch.testing.assert_close(value.double(), expected[name], msg=f"ema_model: {name}")

    # validation inside the fit saw the average: the last logged validation loss, against a plain module holding it
    plain = TinyModule(batchnorm=False)
    plain.load_state_dict(whole.ema_model.state_dict())
    plain.eval()
    x, y = loader(2, n=32).dataset[rank::2]  # this rank's share (Lightning's DistributedSampler, unshuffled)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(plain(x), y)
    logged = trainer.callback_metrics["val_loss"]  # this rank's mean (the module logs without sync_dist)
    torch.testing.assert_close(float(logged), float(loss), atol=1e-5, rtol=1e-5, msg="val_loss")

    _, _, first = fit(out / "split", 1)
    first.save_checkpoint(out / "split" / "mid.ckpt")  # every rank calls; rank 0 writes every rank's slice
    saved = torch.load(out / "split" / "mid.ckpt", weights_only=False)["callbacks"]
    (callback_state,) = [v for k, v in saved.items() if k.startswith("EMACallback")]
    assert [s["partitioning"]["rank"] for s in callback_state["ema"]["per_rank_states"]] == [0, 1], callback_state
    resumed, _, _ = fit(out / "split", 2, ckpt_path=out / "split" / "mid.ckpt")
    mine = resumed.ema.state_dict()
    assert mine["num_updates"] == state["num_updates"], (mine["num_updates"], state["num_updates"])
    for name, value in state["weights"].items():
        assert torch.equal(mine["weights"][name], value), f"rank {rank}: resumed slice differs: {name}"
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)
