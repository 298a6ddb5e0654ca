"""One training run of a task: the training weights and every average, evaluated together."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from emakit import EMA, Trainer
from emakit.demo import torch_threads
from emakit.eval_weights import TRAINING
from emakit.evidence.tasks import Task

__all__ = ["TRAINING", "train_once"]

# TRAINING ("training"): the curve of the training weights, a run without EMA; their metrics are NAME/training


def train_once(
    task: Task,
    seed: int,
    schedule: str,
    half_lives: Sequence[str],
    *,
    steps: int | None = None,
    eval_every: int | None = None,
    warmup: str | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Train ``task`` once with one EMA of all ``half_lives``; the metric of every weights at every evaluation.

    ``Trainer(eval_weights="both")`` evaluates the training weights and each average at the same
    steps of the same run. The averages never change training (``tests/test_evidence.py`` compares a run
    without EMA bit for bit), so the ``"training"`` curve is the curve of a run without EMA.

    Returns ``{"seed", "schedule", "steps": [...], "curves": {"training": [...], "ema@50ba": [...]},
    "seconds"}``; ``steps`` are the optimizer steps at which each evaluation ran.
    """
    steps = task.steps if steps is None else steps
    eval_every = task.eval_every if eval_every is None else eval_every
    ema = EMA(half_life=tuple(half_lives), warmup=warmup) if half_lives else None
    with torch_threads(task.threads):
        torch.manual_seed(seed)
        setup = task.setup(schedule, steps)
        trainer = Trainer(
            model=setup.model,
            train_dataloader=setup.train_dataloader,
            eval_dataloader=setup.eval_dataloader,
            max_duration=f"{steps}ba",
            optimizers=setup.optimizer,
            schedulers=setup.scheduler,
            algorithms=[ema] if ema is not None else [],
            callbacks=setup.callbacks,
            eval_interval=f"{eval_every}ba",
            seed=seed,
            progress_bar=progress_bar,
            eval_weights="both",
        )
        started = time.perf_counter()
        with warnings.catch_warnings():  # the study measures half-lives too long for the run on purpose
            warnings.filterwarnings("ignore", "EMA: .* too few for the half-life", UserWarning)
            trainer.fit()
        seconds = time.perf_counter() - started
    history = trainer.state.eval_history
    labels = [TRAINING, *(ema.labels if ema is not None else [])]
    return {
        "seed": seed,
        "schedule": schedule,
        "steps": [entry["batch"] for entry in history],
        "curves": {label: [entry[f"{task.metric}/{label}"] for entry in history] for label in labels},
        "seconds": round(seconds, 1),
    }
