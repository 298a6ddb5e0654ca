"""Trainer overhead: the wall time of a short Trainer run with an EMA every batch against one without."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, Trainer
from emakit.algorithms import EMAAlgorithm
from emakit.bench import targets

__all__ = ["bench_trainer"]


class _TimedEMAAlgorithm(EMAAlgorithm):
    """An EMA's trainer adapter, also summing the wall time spent in its event handlers (updates and swaps)."""

    def __init__(self, ema: EMA) -> None:
        super().__init__(ema)
        self.seconds = 0.0

    def apply(self, event: Any, state: Any, logger: Any) -> None:
        start = time.perf_counter()
        super().apply(event, state, logger)
        self.seconds += time.perf_counter() - start


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _train(data: TensorDataset, batches: int, with_ema: bool, device: torch.device) -> tuple[float, Trainer]:
    """Wall seconds of ``Trainer.fit`` of ``batches`` batches of a small CNN, with EMA every batch or not."""
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(_small_cnn()),
        train_dataloader=DataLoader(data, batch_size=32),
        max_duration=f"{batches}ba",
        algorithms=[_TimedEMAAlgorithm(EMA(half_life="50ba"))] if with_ema else [],
        device=device,
        seed=0,
        progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start, trainer


def bench_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer wall time with ``EMA(half_life="50ba")`` every batch over without; alternated, median ratio.

    ``ema_share``: the wall time inside the EMA's event handlers over the run's, median over the runs.
    """
    batches, pairs, side = (4, 1, 8) if args.quick else (150, max(3, args.repeats // 6), 32)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batches * 32, 3, side, side, generator=generator),
        torch.randint(0, 10, (batches * 32,), generator=generator),
    )
    _train(data, min(batches, 10), True, args.device)  # warm-up
    with_ema, without, ratios, inside = [], [], [], []
    for pair in range(pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        runs = {flag: _train(data, batches, flag, args.device) for flag in order}
        with_ema.append(runs[True][0])
        without.append(runs[False][0])
        ratios.append(runs[True][0] / runs[False][0])
        inside.append(cast(_TimedEMAAlgorithm, runs[True][1].engine.algorithms[0]).seconds / runs[True][0])
    share = statistics.median(inside)
    return {
        "batches": batches,
        "pairs": pairs,
        "with_ema_s": statistics.median(with_ema),
        "without_ema_s": statistics.median(without),
        "ratio": statistics.median(ratios),
        "ema_share": share,
        "targets": targets.EMA_SHARE.judge(share),
    }
