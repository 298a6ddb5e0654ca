"""Train a small CNN on 8x8 digits with an EMA and compare how noisy eval accuracy is with and without it.

One run evaluates both the training weights ("without EMA": the EMA never changes training,
so they are a run without it) and the average ("with EMA") at every epoch
(``Trainer(eval_weights="both")``). The optimizer is deliberately noisy (SGD, high learning rate,
small batches), so the training weights jump around from epoch to epoch while their
moving average does not; early on the average lags (it starts from the first weights).
Writes ``metrics.json`` and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, Trainer
from emakit.eval_weights import TRAINING

__all__ = ["add_arguments", "run"]

LR = 0.4  # plain SGD with a high learning rate and small batches: noisy training weights
BATCH_SIZE = 16
LABEL_SMOOTHING = 0.1  # keeps the gradient noise from dying out as the training loss nears zero
TEST_SIZE = 899  # of the 1797 digits; the split is fixed (random_state=0, stratified)
TAIL = 10  # the last evaluations summarised


def _missing(package: str) -> ImportError:
    return ImportError(f"emakit demo needs {package}: pip install 'emakit[demo]'")


def load_data() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits as (train, test) tensors, standardised with the train statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise _missing("scikit-learn") from error
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_SIZE, random_state=0, stratify=digits.target
    )
    mean, std = x_train.mean(), x_train.std()

    def tensors(x: Any, y: Any) -> TensorDataset:
        inputs = torch.tensor((x - mean) / std, dtype=torch.float32).unsqueeze(1)
        return TensorDataset(inputs, torch.tensor(y, dtype=torch.long))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def make_model() -> nn.Module:
    """A small CNN for 1x8x8 inputs and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32x4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run torch on ``count`` CPU threads inside (``None``: as many as before).

    For models as small as this one, more threads only wait on each other.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(data: tuple[TensorDataset, TensorDataset], args: argparse.Namespace, ema: EMA) -> list[dict[str, float]]:
    """One training run with ``ema``, measuring the training weights and the average at every evaluation.

    The EMA never changes training (``tests/test_trainer.py`` checks it bit for bit), so the training
    weights' curve is the curve of a run without EMA.
    """
    torch.manual_seed(args.seed)
    module = make_model()
    train_set, test_set = data
    trainer = Trainer(
        model=Classifier(module, functools.partial(F.cross_entropy, label_smoothing=LABEL_SMOOTHING)),
        train_dataloader=DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True),
        eval_dataloader=DataLoader(test_set, batch_size=len(test_set)),
        max_duration=f"{args.epochs}ep",
        optimizers=torch.optim.SGD(module.parameters(), lr=LR),
        algorithms=[ema],
        eval_interval="1ep",
        seed=args.seed,  # also fixes the shuffling order of every epoch
        progress_bar=args.progress_bar,
        eval_weights="both",
    )
    trainer.fit()
    return [dict(entry) for entry in trainer.state.eval_history]


def split_runs(history: list[dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    """The eval history of the training weights ("without EMA") and of the average ("with EMA")."""

    def of(suffix: str) -> list[dict[str, float]]:
        return [
            {"batch": e["batch"], "epoch": e["epoch"], "loss": e[f"loss{suffix}"], "accuracy": e[f"accuracy{suffix}"]}
            for e in history
        ]

    return {"without EMA": of(f"/{TRAINING}"), "with EMA": of("")}


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Final accuracy and the mean and std of the last ``TAIL`` eval accuracies."""
    tail = [entry["accuracy"] for entry in history[-TAIL:]]
    return {
        "final_accuracy": history[-1]["accuracy"],
        "tail_mean_accuracy": statistics.fmean(tail),
        "tail_std_accuracy": statistics.pstdev(tail),
        "tail_evals": len(tail),
    }


def format_table(summaries: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per run."""
    n = next(iter(summaries.values()))["tail_evals"]
    header = f"{'run':<12} {'final acc':>10} {f'mean last {n}':>13} {f'std last {n}':>12}"
    rows = [
        f"{name:<12} {s['final_accuracy']:>10.4f} {s['tail_mean_accuracy']:>13.4f} {s['tail_std_accuracy']:>12.4f}"
        for name, s in summaries.items()
    ]
    return "\n".join([header, "-" * len(header), *rows])


def import_pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise _missing("matplotlib") from error
    return plt


def plot(histories: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    """Eval accuracy per epoch of every run, as a PNG; the last ``TAIL`` epochs (the table's) shaded."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot([e["epoch"] for e in history], [e["accuracy"] for e in history], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy")
    epochs = [e["epoch"] for e in next(iter(histories.values()))]
    first = epochs[-min(TAIL, len(epochs))]
    ax.axvspan(first - 0.5, epochs[-1] + 0.5, color="0.9", label=f"last {TAIL} epochs")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return int(text)

    return parse


def _half_life(text: str) -> str:
    try:
        EMA(half_life=text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``emakit demo`` options."""
    parser.add_argument("--epochs", type=_int_at_least(1), default=40, help="epochs per run (default: 40)")
    parser.add_argument(
        "--half-life",
        type=_half_life,
        default="100ba",
        help="the EMA's half_life, e.g. 100ba, 2ep or 0.05dur (default: 100ba)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of both runs (default: 0)")
    parser.add_argument(
        "--no-progress-bar",
        dest="progress_bar",
        action="store_false",
        help="no progress bar (shown only on a terminal anyway)",
    )


def run(args: argparse.Namespace) -> int:
    """Train once, print the table of both weights, write metrics.json and accuracy.png; returns the exit code."""
    data = load_data()
    import_pyplot()  # fail before training, not after, when matplotlib is missing
    args.out.mkdir(parents=True, exist_ok=True)
    ema = EMA(half_life=args.half_life)
    started = time.perf_counter()
    with torch_threads(1):
        histories = split_runs(train(data, args, ema))
    seconds = time.perf_counter() - started
    summaries = {name: summarize(history) for name, history in histories.items()}
    settings = {
        "dataset": "sklearn.datasets.load_digits, stratified split, random_state=0",
        "epochs": args.epochs,
        "half_life": str(ema.half_life),
        "smoothing": ema.smoothing,
        "seed": args.seed,
        "optimizer": "SGD",
        "lr": LR,
        "label_smoothing": LABEL_SMOOTHING,
        "batch_size": BATCH_SIZE,
        "train_size": len(data[0]),
        "test_size": len(data[1]),
        "train_seconds": round(seconds, 2),
    }
    runs = {name: {"eval": histories[name], "summary": summaries[name]} for name in histories}
    metrics = {"settings": settings, "runs": runs}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    title = f"8x8 digits, SGD lr {LR} batch {BATCH_SIZE}, EMA half_life {ema.half_life}, seed {args.seed}"
    plot(histories, args.out / "accuracy.png", title)
    print(f"{title}, {args.epochs} epochs ({seconds:.0f} s)")
    print(format_table(summaries))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'accuracy.png'}")
    return 0
