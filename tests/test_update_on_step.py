"""``ema.update_on_step(optimizer, model)``: the average follows every ``optimizer.step()`` by itself, against the
float64 closed form; steps a GradScaler skips are not counted; several optimizers count once per training step."""

from __future__ import annotations

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA

SMOOTHING = 0.5


def setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))


def assert_average(ema: EMA, reference: ClosedForm) -> None:
    assert reference.ema is not None
    for key, value in ema.ema_state_dict().items():
        torch.testing.assert_close(value.double(), reference.ema[key], rtol=1e-6, atol=1e-7, msg=key)


def test_every_optimizer_step_updates_and_remove_stops_it() -> None:
    model, optimizer = setup()
    ema, reference = EMA(smoothing=SMOOTHING), ClosedForm(SMOOTHING)
    hooks = ema.update_on_step(optimizer, model)
    for _ in range(4):
        loss(model).backward()
        optimizer.step()  # no ema.update(model) here
        optimizer.zero_grad()
        reference.update(weights(model))
    assert ema.num_updates == 4
    assert_average(ema, reference)
    hooks.remove()
    hooks.remove()  # twice is fine
    loss(model).backward()
    optimizer.step()
    assert ema.num_updates == 4, "removed hooks must not update"
    ema.update(model)  # by hand again, once the hooks are gone
    reference.update(weights(model))
    assert_average(ema, reference)


def test_a_step_the_grad_scaler_skips_is_not_counted() -> None:
    model, optimizer = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ema, reference = EMA(smoothing=SMOOTHING), ClosedForm(SMOOTHING)
    with ema.update_on_step(optimizer, model):
        for step in range(4):
            scaler.scale(loss(model) * (float("inf") if step == 2 else 1.0)).backward()
            before = weights(model)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if step == 2:  # inf gradients: the scaler skipped optimizer.step()
                assert all(torch.equal(before[k], v) for k, v in weights(model).items())
            else:
                reference.update(weights(model))
    assert ema.num_updates == 3 and ema.batches_seen == 3
    assert_average(ema, reference)
    assert not ema._step_hooks, "leaving the with block removes the hooks"


def test_several_optimizers_count_once_per_training_step() -> None:
    torch.manual_seed(0)
    generator, critic = nn.Linear(4, 4), nn.Linear(4, 1)
    model = nn.ModuleDict({"generator": generator, "critic": critic})
    g_opt, c_opt = torch.optim.SGD(generator.parameters(), lr=0.1), torch.optim.SGD(critic.parameters(), lr=0.1)
    ema, reference = EMA(smoothing=SMOOTHING), ClosedForm(SMOOTHING)
    ema.update_on_step([g_opt, c_opt], model)
    for _ in range(3):
        critic(generator(torch.randn(8, 4))).mean().backward()
        updates = ema.num_updates
        c_opt.step()
        assert ema.num_updates == updates, "no update after one of the two optimizers alone"
        g_opt.step()
        assert ema.num_updates == updates + 1, "one update once both optimizers stepped"
        g_opt.zero_grad()
        c_opt.zero_grad()
        reference.update(weights(model))
    assert_average(ema, reference)


def test_counting_twice_is_refused() -> None:
    model, optimizer = setup()
    ema = EMA(smoothing=SMOOTHING)
    hooks = ema.update_on_step(optimizer, model)
    with pytest.raises(RuntimeError, match=r"calling update\(\) too would count each step twice"):
        ema.update(model)
    with pytest.raises(RuntimeError, match="updates on optimizer steps already"):
        ema.update_on_step(optimizer, model)
    hooks.remove()
    trained = EMA(smoothing=SMOOTHING)
    trained.as_algorithm()  # what Trainer(algorithms=[ema]) does
    with pytest.raises(RuntimeError, match="a Trainer runs this EMA"):
        trained.update_on_step(optimizer, model)
    with pytest.raises(ValueError, match=r"ema_start='2ep' counts epochs"):
        EMA(smoothing=SMOOTHING, ema_start="2ep").update_on_step(optimizer, model)
    with pytest.raises(ValueError, match=r"takes torch optimizers, got \['Sequential'\]"):
        EMA().update_on_step([model], model)
    with pytest.raises(TypeError, match="takes the model"):
        EMA().update_on_step(optimizer, model.parameters())
