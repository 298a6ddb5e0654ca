"""Uniform (SWA) and windowed averages, alone or beside exponential ones, against their float64 definitions."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from closed_form import ClosedForm, uniform_mean, window_mean
from test_trainer import Recorder, eval_loader, make_model, make_trainer, manual_eval
from torch import nn
from torchrun import torchrun

from emakit import EMA


def bn_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).to(dtype)


def train(model: nn.Module, emas: list[EMA], steps: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    """``steps`` SGD steps (batches ``start``..), each EMA told of each; the float64 weights after every step (the
    floating-point ones)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    history = []
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        model(torch.randn(8, 5, generator=generator).to(next(model.parameters()).dtype)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()})
        for ema in emas:
            ema.update(model)
    return history


def assert_average(ema: EMA, label: str, reference: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    average = ema.ema_state_dict(label)
    for name, value in reference.items():
        torch.testing.assert_close(average[name].double(), value, rtol=rtol, atol=rtol, msg=f"{label} {name}")


@pytest.mark.parametrize(
    ("average", "dtype", "options"),
    [
        (["uniform", "window", "exponential"], torch.float32, {}),
        (["window", "uniform", "exponential"], torch.float32, {"flatten_model": True}),  # the window binds the model
        (["uniform", "window", "exponential"], torch.float32, {"flatten_model": True}),  # the uniform one does
        (["exponential", "uniform", "window"], torch.bfloat16, {}),  # fp32 averages of bf16 weights
    ],
)
def test_uniform_and_window_equal_their_definitions_every_update(average, dtype, options):
    """Updates every 2nd batch from batch 3: the averages hold the weights of batches 4, 6, 8, ... only."""
    ema = EMA(
        half_life="6ba", average=average, window="12ba", window_blocks=3, update_interval="2ba", ema_start="3ba",
        **options,
    )  # fmt: skip
    model, exponential = bn_model(dtype), ClosedForm(ema.smoothing)
    due = []
    for batch in range(1, 32):
        (weights,) = train(model, [ema], steps=1, start=batch)
        if batch % 2 or batch < 3:
            continue
        due.append(weights)
        exponential.update(weights)
        assert_average(ema, "uniform", uniform_mean(due))
        assert_average(ema, "window@12ba", window_mean(due, per_block=2, blocks=3))  # 12 batches: 6 updates
        assert_average(ema, "ema@6ba", {k: v for k, v in exponential.ema.items() if v.is_floating_point()})
    assert ema.num_updates == len(due) == 14
    assert ema.ema_state_dict("window@12ba")["1.num_batches_tracked"] == 30  # copied: the last completed block's


def test_a_window_keeps_its_blocks_in_bounded_memory():
    ema = EMA(window="8ba", window_blocks=4)  # 4 blocks of 2 updates
    model = bn_model()
    train(model, [ema], steps=3)
    one = ema.shadow.nbytes
    train(model, [ema], steps=40, start=3)
    window = ema._windows[0]
    assert len(window.completed) == 4 and window.nbytes == 5 * one  # 4 completed blocks and the one filling


def test_a_resumed_window_and_uniform_average_continue_bit_for_bit():
    def make() -> EMA:
        return EMA(half_life="4ba", average=["exponential", "uniform", "window"], window="9ba", window_blocks=3)

    whole, model = make(), bn_model()
    train(model, [whole], steps=25)

    first, model = make(), bn_model()
    train(model, [first], steps=11)  # mid-block: 11 = 3 blocks of 3 and 2 of the fourth
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    train(model, [resumed], steps=14, start=11)
    for label in whole.labels:
        for name, value in whole.ema_state_dict(label).items():
            assert torch.equal(resumed.ema_state_dict(label)[name], value), (label, name)

    other = EMA(half_life="4ba", average=["exponential", "uniform", "window"], window="12ba", window_blocks=3)
    with pytest.raises(ValueError, match="windows \\['9ba'\\] saved, \\['12ba'\\] here"):
        other.load_state_dict(first.state_dict())


def test_the_trainer_evaluates_uniform_and_window_averages_in_epochs_and_update_bn_measures_them():
    ema = EMA(average=["uniform", "window"], window="2ep", window_blocks=2, update_interval="1ep")
    model, recorder = make_model(), Recorder()
    trainer = make_trainer(
        model, "5ep", eval_dataloader=eval_loader(), algorithms=[ema], callbacks=[recorder], eval_weights="both"
    )
    trainer.fit()
    epochs = [recorder.epoch_weights[epoch] for epoch in sorted(recorder.epoch_weights)]
    assert len(epochs) == 5 and ema.labels == ["uniform", "window@2ep"]
    assert_average(ema, "uniform", uniform_mean(epochs))
    assert_average(ema, "window@2ep", window_mean(epochs, per_block=1, blocks=2))  # epochs 4 and 5
    last = trainer.state.eval_history[-1]
    for label in ema.labels:
        with ema.ema_weights(model, label):
            assert last[f"loss/{label}"] == pytest.approx(manual_eval(model, eval_loader())["loss"], rel=1e-5)

    bn, swa = bn_model(), EMA(average="uniform")
    train(bn, [swa], steps=6)
    loader = [torch.randn(16, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    training_statistics = bn[1].running_mean.clone()
    swa.update_bn(loader, bn)
    measured = bn_model()
    measured.load_state_dict(swa.ema_state_dict())
    measured[1].reset_running_stats()
    measured[1].momentum = None  # the cumulative mean over the pass, as update_bn measures
    measured.train()
    with torch.no_grad():
        for batch in loader:
            measured(batch)
    torch.testing.assert_close(swa.ema_state_dict()["1.running_mean"], measured[1].running_mean)
    assert torch.equal(bn[1].running_mean, training_statistics)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"average": "mean"}, "each entry must be one of \\['exponential', 'uniform', 'window'\\]"),
        ({"average": ["uniform", "uniform"]}, "repeats 'uniform'"),
        ({"half_life": ("4ba", "8ba"), "average": ["exponential", "uniform"]}, "asks for 1 exponential averages"),
        ({"window": "1000ba", "average": "uniform"}, "has 0 'window' entries but window='1000ba' gives 1"),
        ({"window": "10ba"}, "window='10ba' must be a multiple of window_blocks=4 times update_interval='1ba'"),
        ({"window": "8ba", "update_interval": "1ep"}, "window='8ba' must be a multiple"),
        ({"window": "0ba"}, "must be > 0 in 'ba' or 'ep'"),
        ({"window": "0.5dur"}, "must be > 0 in 'ba' or 'ep'"),
        ({"window": "8ba", "window_blocks": 0}, "window_blocks=0 must be an int >= 1"),
    ],
)
def test_bad_averages_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_a_uniform_average_alone_has_no_smoothing_and_keeps_the_peers_defaults():
    ema = EMA(average="uniform")
    assert ema.labels == ["uniform"] and ema.smoothing is None and str(ema.update_interval) == "1ba"
    assert repr(ema) == "EMA(average='uniform', update_interval='1ba', ema_start='0.0dur')"
    model = bn_model()
    history = train(model, [ema], steps=5)
    assert ema.last_smoothing is None
    assert_average(ema, "uniform", uniform_mean(history))
    assert EMA(window="8ba").labels == ["window@8ba"] and EMA().labels == ["ema@1000ba"]


def test_uniform_and_window_averages_split_across_ranks_under_fsdp2_and_shard_over_ranks():
    result = torchrun(Path(__file__).parent / "averages_script.py", timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": fsdp2 ok") == 2 and result.stdout.count(": shard_over_ranks ok") == 2


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_uniform_and_window_averages_of_zero3_partitions(deepspeed_cpu):
    """DeepSpeed ZeRO-3 on 2 CPU processes: each rank averages its fp32 master partitions, the window's blocks too;
    see ``averages_zero_script.py`` for what each step checks."""
    result = torchrun(Path(__file__).parent / "averages_zero_script.py", timeout=240, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]


def test_lightning_and_hugging_face_keep_uniform_and_window_averages(tmp_path):
    """The integrations count optimizer steps: the averages hold each step's weights, by their definitions."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel

    from emakit.integrations.lightning import EMACallback

    class Steps(pl.Callback):
        def __init__(self) -> None:
            self.weights: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, module, *args) -> None:
            self.weights.append({k: v.detach().double() for k, v in module.state_dict().items()})

    callback, steps = EMACallback(average=["uniform", "window"], window="6ba", window_blocks=3), Steps()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=10, callbacks=[callback, steps], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(BoringModel())
    assert len(steps.weights) == 10
    assert_average(callback.ema, "uniform", uniform_mean(steps.weights))
    assert_average(callback.ema, "window@6ba", window_mean(steps.weights, per_block=2, blocks=3))

    pytest.importorskip("transformers")
    import test_integration_transformers as hf

    recorder, ema = hf.Recorder(), EMA(average=["uniform", "window"], window="8ba", window_blocks=2)
    dataset = hf.make_data(16, seed=2)
    trainer = hf.EMATrainer(
        model=hf.make_model(), args=hf.make_args(tmp_path / "hf"), train_dataset=hf.make_data(96, seed=1),
        callbacks=[recorder], ema=ema,
    )  # fmt: skip
    trainer.train()
    assert len(recorder.steps) == hf.STEPS == 12
    assert_average(ema, "uniform", uniform_mean(recorder.steps))
    assert_average(ema, "window@8ba", window_mean(recorder.steps, per_block=4, blocks=2))  # steps 5 to 12
    expected = hf.plain_eval(hf.make_model(), ema.ema_state_dict("uniform"), dataset, tmp_path)
    assert trainer.evaluate(dataset)["eval_loss"] == pytest.approx(expected, rel=1e-5)
