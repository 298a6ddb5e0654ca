"""The two code examples of the specification (EMA.md), run with only their import lines changed.

The example code sits in this file nearly verbatim. Where the specification leaves names
undefined (``torch``, ``F``, ``num_epochs``, a model, data loaders, ``tests.common``) they
are defined here; the functional example returns its ``ema_model`` so it can be checked.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit import Callback

# example 1's import line (was: import composer.functional as cf)
import emakit.functional as cf  # isort: skip

num_epochs = 2


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def random_classification_dataset(size: int = 48, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 8, generator=generator)
    targets = torch.randint(0, 3, (size,), generator=generator)
    return TensorDataset(inputs, targets)


# ----------------------------------------------------------------- example 1: the functional interface
# Verbatim but for its import line (at the top of this file) and the added `return ema_model`.

# fmt: off
# Run the EMA algorithm directly on the batch data using the Composer functional API


def training_loop(model, train_loader):
    opt = torch.optim.Adam(model.parameters())
    loss_fn = F.cross_entropy
    ema_model = copy.deepcopy(model)
    model.train()

    for epoch in range(num_epochs):  # noqa: B007
        for X, y in train_loader:
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            cf.compute_ema(model, ema_model, smoothing=0.99)
    return ema_model
# fmt: on


def reference_training_loop(model, train_loader):
    """The same loop, keeping the EMA in float64 by the closed form along the same trajectory."""
    opt = torch.optim.Adam(model.parameters())
    ema = {name: t.detach().double().clone() for name, t in model.state_dict().items()}
    model.train()
    for _ in range(num_epochs):
        for X, y in train_loader:
            F.cross_entropy(model(X), y).backward()
            opt.step()
            opt.zero_grad()
            for name, t in model.state_dict().items():
                ema[name] = 0.99 * ema[name] + 0.01 * t.detach().double()
    return model, ema


def test_functional_example_runs_and_gives_the_closed_form_ema() -> None:
    torch.manual_seed(0)
    model = small_net()
    initial = copy.deepcopy(model)
    train_loader = DataLoader(random_classification_dataset(), batch_size=8)

    ema_model = training_loop(model, train_loader)

    replayed, expected = reference_training_loop(copy.deepcopy(initial), train_loader)
    assert type(ema_model) is type(model)
    ema_state, trained = ema_model.state_dict(), model.state_dict()
    for name, want in expected.items():
        # the replay followed the same trajectory
        assert torch.equal(replayed.state_dict()[name], trained[name]), name
        torch.testing.assert_close(ema_state[name], want.float(), rtol=1e-5, atol=1e-6)
        # 12 updates at smoothing 0.99 leave the average far from the trained weights
        assert not torch.allclose(ema_state[name], trained[name], atol=1e-4), name


# ----------------------------------------------------------------- example 2: the Trainer


class RecordWeights(Callback):
    """The training weights after every batch, in float64 (for the closed form)."""

    def __init__(self) -> None:
        self.after_batch: list[dict[str, torch.Tensor]] = []

    def batch_end(self, state, logger) -> None:
        self.after_batch.append({n: t.detach().double().clone() for n, t in state.model.state_dict().items()})


def run_trainer_example(model, train_dataloader, eval_dataloader):
    """The specification's Trainer example; only the import lines changed."""
    # fmt: off
    # Instantiate the algorithm and pass it into the Trainer
    # The trainer will automatically run it at the appropriate points in the training loop

    from emakit import EMA, Trainer

    ema = EMA(half_life='50ba')

    trainer = Trainer(model=model,
                      train_dataloader=train_dataloader,
                      eval_dataloader=eval_dataloader,
                      max_duration='1ep',
                      algorithms=[ema])

    trainer.fit()

    model = ema.ema_model
    # fmt: on
    return model, ema, trainer


def test_trainer_example_runs_and_ema_model_holds_the_closed_form_ema() -> None:
    torch.manual_seed(0)
    model = emakit.Classifier(small_net())
    initial = copy.deepcopy(model)
    train_dataloader = DataLoader(random_classification_dataset(48, seed=1), batch_size=4)
    eval_dataloader = DataLoader(random_classification_dataset(24, seed=2), batch_size=8)

    ema_model, ema, trainer = run_trainer_example(model, train_dataloader, eval_dataloader)

    # Replay the same training (same data order, same SGD default) without EMA, recording weights.
    recorder = RecordWeights()
    replay = emakit.Trainer(
        model=copy.deepcopy(initial),
        train_dataloader=train_dataloader,
        max_duration="1ep",
        callbacks=[recorder],
        progress_bar=False,
    )
    replay.fit()
    assert len(recorder.after_batch) == 12
    smoothing = 2 ** (-1 / 50)
    assert ema.smoothing == pytest.approx(smoothing, rel=1e-15)
    assert ema.num_updates == 12
    expected = dict(recorder.after_batch[0])  # the average starts at the weights after the first batch
    for weights in recorder.after_batch[1:]:
        expected = {n: smoothing * expected[n] + (1 - smoothing) * weights[n] for n in expected}

    assert isinstance(ema_model, emakit.Classifier)
    assert isinstance(ema_model.module, nn.Sequential)
    ema_state = ema_model.state_dict()
    training_state = trainer.state.model.state_dict()
    assert ema_state.keys() == training_state.keys() == expected.keys()
    for name, want in expected.items():
        torch.testing.assert_close(ema_state[name], want.float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(training_state[name], recorder.after_batch[-1][name].float()), name
        assert not torch.allclose(ema_state[name], training_state[name], atol=1e-4), name

    # evaluation ran, with the EMA weights
    history = trainer.state.eval_history
    assert len(history) >= 1
    assert {"accuracy", "loss", "batch", "epoch"} <= history[-1].keys()
    assert history[-1]["batch"] == 12
    with torch.no_grad():
        inputs, targets = eval_dataloader.dataset.tensors
        outputs = ema_model.module(inputs)
        ema_loss = F.cross_entropy(outputs, targets).item()
        ema_accuracy = (outputs.argmax(-1) == targets).float().mean().item()
    assert history[-1]["loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert history[-1]["accuracy"] == pytest.approx(ema_accuracy, abs=1e-9)
