"""The study's tasks: a dataset, a model and how the paper or project it comes from trains it.

A :class:`Task` says what is measured (``metric``, which direction is better, a target to reach, a
published baseline) and builds a fresh :class:`Setup` (model, data, optimizer, schedule) for one seed.
Every task trains with a ``"constant"`` learning rate or a ``"cosine"`` one (decayed to
``min_lr_ratio`` of the peak by the last step, after ``warmup_steps`` of linear warmup).

- ``digits``: :mod:`emakit.demo`'s CNN and noisy SGD on scikit-learn's bundled 8x8 digits, 40 epochs.
- ``mnist1d``: MNIST-1D (Greydanus & Kobak, ICML 2024) generated offline by the ``mnist1d`` package,
  the paper's ``ConvBase`` CNN, Adam 1e-2, batch 100, 8000 steps (the paper's table: CNN 94%).
- ``shakespeare-char``: :mod:`emakit.evidence.charlm`, nanoGPT's CPU configuration.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import Callback, Classifier

__all__ = ["SCHEDULES", "TASKS", "Setup", "Task", "learning_rate_factor"]

SCHEDULES = ("constant", "cosine")


@dataclass
class Setup:
    """What one training run needs, built fresh for each seed and schedule."""

    model: nn.Module
    train_dataloader: Any
    eval_dataloader: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    callbacks: list[Callback] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """A dataset and model as trained in the study.

    ``setup(schedule, steps)`` runs after ``torch.manual_seed(seed)``; ``steps`` and ``eval_every``
    are in optimizer steps (batches). ``target`` is the value whose first crossing the report times;
    ``baseline`` a published result of the same setup, drawn in the plot. ``schedules`` and ``seeds``
    are the study's defaults.
    """

    name: str
    description: str
    metric: str
    higher_is_better: bool
    steps: int
    eval_every: int
    target: float
    setup: Callable[[str, int], Setup]
    baseline: tuple[str, float] | None = None
    schedules: tuple[str, ...] = SCHEDULES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    threads: int | None = None  # torch threads; 1 for models so small that more threads only wait


def learning_rate_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The multiple of the peak learning rate used for optimizer step ``step`` (0-based) of ``steps``.

    Linear warmup ``(step + 1) / (warmup_steps + 1)`` for the first ``warmup_steps`` (as nanoGPT), then
    ``1`` (``"constant"``) or ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` going from
    0 after warmup to 1 at the last step (``"cosine"``).

    Example::

        >>> learning_rate_factor(99, 100, "cosine")
        0.0
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: allowed are {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(
        learning_rate_factor, steps=steps, schedule=schedule, warmup_steps=warmup_steps, min_ratio=min_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------ digits
def _digits(schedule: str, steps: int) -> Setup:
    from emakit import demo

    train_set, test_set = demo.load_data()
    module = demo.make_model()
    optimizer = torch.optim.SGD(module.parameters(), lr=demo.LR)
    return Setup(
        model=Classifier(module, functools.partial(F.cross_entropy, label_smoothing=demo.LABEL_SMOOTHING)),
        train_dataloader=DataLoader(train_set, batch_size=demo.BATCH_SIZE, shuffle=True),
        eval_dataloader=DataLoader(test_set, batch_size=len(test_set)),
        optimizer=optimizer,
        scheduler=_scheduler(optimizer, schedule, steps),
    )


# ------------------------------------------------------------------ MNIST-1D
class ConvBase(nn.Module):
    """The MNIST-1D paper's CNN: three strided 1-D convolutions of 25 channels, then a linear layer.

    As in the paper's code (``notebooks/models.py``): kernels 5, 3, 3, stride 2, padding 1, ReLU;
    a length-40 input leaves 25 x 5 features. 5,210 parameters.
    """

    def __init__(self, classes: int = 10, channels: int = 25, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.linear = nn.Linear(channels * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.unsqueeze(1)).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


@functools.cache
def mnist1d_data() -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D as the paper uses it: ``make_dataset(get_dataset_args())``, 4000 train / 1000 test of length 40.

    Generated offline from the package's templates (seed 42); never downloaded.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("the mnist1d task needs the mnist1d package: pip install 'emakit[evidence]'") from error
    data = make_dataset(get_dataset_args())

    def tensors(x: Any, y: Any) -> TensorDataset:
        return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))

    return tensors(data["x"], data["y"]), tensors(data["x_test"], data["y_test"])


def _mnist1d(schedule: str, steps: int) -> Setup:
    train_set, test_set = mnist1d_data()
    module = ConvBase()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    return Setup(
        model=Classifier(module),
        train_dataloader=DataLoader(train_set, batch_size=100, shuffle=True),
        eval_dataloader=DataLoader(test_set, batch_size=len(test_set)),
        optimizer=optimizer,
        scheduler=_scheduler(optimizer, schedule, steps),
    )


def _shakespeare(schedule: str, steps: int) -> Setup:
    from emakit.evidence import charlm

    model, train_loader, eval_loader, optimizer = charlm.setup()
    return Setup(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        optimizer=optimizer,
        scheduler=_scheduler(optimizer, schedule, steps, charlm.WARMUP_STEPS, charlm.MIN_LR_RATIO),
        callbacks=[charlm.ClipGradNorm(charlm.GRAD_CLIP)],
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="digits",
            description="scikit-learn 8x8 digits, emakit demo's CNN, SGD lr 0.4 batch 16, 40 epochs of 57 batches",
            metric="accuracy",
            higher_is_better=True,
            steps=40 * 57,
            eval_every=57,
            target=0.95,
            setup=_digits,
            threads=1,
        ),
        Task(
            name="mnist1d",
            description="MNIST-1D (4000/1000), the paper's ConvBase CNN, Adam lr 1e-2 batch 100, 8000 steps",
            metric="accuracy",
            higher_is_better=True,
            steps=8000,
            eval_every=100,
            target=0.90,
            setup=_mnist1d,
            baseline=("paper's CNN", 0.94),
            threads=1,
        ),
        Task(
            name="shakespeare-char",
            description=(
                "character-level GPT (nanoGPT's CPU configuration: 4 layers, 4 heads, 128 wide, block 64, "
                "batch 12, AdamW lr 1e-3, no dropout) on 1.1 MB of Shakespeare's plays, 2000 steps"
            ),
            metric="loss",
            higher_is_better=False,
            steps=2000,
            eval_every=50,
            target=2.0,
            setup=_shakespeare,
            baseline=("nanoGPT's CPU run", 1.88),
            schedules=("cosine", "constant"),
            seeds=(0, 1, 2),
        ),
    )
}
