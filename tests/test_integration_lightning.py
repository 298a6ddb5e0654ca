"""emakit.integrations.lightning.EMACallback with the real Lightning, against the float64 closed form.

A tiny LightningModule trained on CPU for a few steps; a recorder callback listed before the EMA's
records the weights after every optimizer step, so the average can be recomputed independently.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from closed_form import ClosedForm
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchrun import torchrun

from emakit.integrations.lightning import EMACallback

SMOOTHING = 0.8
ATOL, RTOL = 1e-6, 1e-5
DDP_SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")


class TinyModule(pl.LightningModule):
    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(4, 8), norm, nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), on_epoch=True, batch_size=len(y))

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def loader(seed: int, n: int = 48) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return DataLoader(data, batch_size=8)


def weights64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


class StepRecorder(pl.Callback):
    """The module's weights after each optimizer step (listed before the EMA: it sees what the EMA averages)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step not in self.steps and trainer.global_step > 0:
            self.steps[trainer.global_step] = weights64(pl_module)


def make_trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer (one device unless ``devices`` is given; deterministic unless told otherwise)."""
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("deterministic", True)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def closed_form(*runs: dict[int, dict[str, torch.Tensor]], smoothing: float = SMOOTHING) -> dict[str, torch.Tensor]:
    """The float64 EMA of each run's recorded weights (step -> weights), in step order, one run after another."""
    reference = ClosedForm(smoothing)
    for steps in runs:
        for step in sorted(steps):
            reference.update({k: v.double() for k, v in steps[step].items()})
    return reference.ema


class AverageRecorder(pl.Callback):
    """After each optimizer step, the epoch and the average (None before it starts); listed after the EMA."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.steps: dict[int, tuple[int, dict[str, torch.Tensor] | None]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step not in self.steps and trainer.global_step > 0:
            average = weights64(self.ema.ema_model) if self.ema.ema.started else None
            self.steps[trainer.global_step] = (trainer.current_epoch, average)


class LateRestoreStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, restoring checkpoints after setup (and on_fit_start) like FSDP/DeepSpeed."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def assert_close_to(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].double(), value, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_average_follows_the_closed_form_of_the_optimizer_steps(tmp_path, accumulate):
    recorder, ema = StepRecorder(), EMACallback(smoothing=SMOOTHING)
    module = TinyModule()
    trainer = make_trainer(tmp_path, [recorder, ema], accumulate_grad_batches=accumulate, enable_checkpointing=False)
    trainer.fit(module, loader(1), loader(2))
    assert len(recorder.steps) == 12 // accumulate == trainer.global_step  # one update per optimizer step
    assert ema.ema.num_updates == trainer.global_step
    assert_close_to(ema.ema_model.state_dict(), closed_form(recorder.steps))
    assert_close_to(weights64(module), recorder.steps[trainer.global_step])  # training ends on the training weights


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_half_life_too_long_for_the_run_warns_with_the_optimizer_steps(tmp_path, accumulate):
    ema = EMACallback(half_life="100ba")
    trainer = make_trainer(tmp_path, [ema], accumulate_grad_batches=accumulate, enable_checkpointing=False)
    steps = 12 // accumulate
    with pytest.warns(UserWarning, match=f"{steps} batches are averaged") as caught:
        trainer.fit(TinyModule(), loader(1))
    message = next(str(w.message) for w in caught if "half-life" in str(w.message))
    assert f"ema@100ba (100 batches) ends holding {0.5 ** (steps / 100):.0%}" in message


def test_a_half_life_in_dur_is_a_fraction_of_the_optimizer_steps(tmp_path):
    recorder, ema = StepRecorder(), EMACallback(half_life="0.25dur")
    trainer = make_trainer(tmp_path, [recorder, ema], accumulate_grad_batches=2, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader(1))
    smoothing = 2 ** (-1 / 1.5)  # 0.25 of the 6 optimizer steps
    assert ema.ema.smoothing == smoothing
    assert_close_to(ema.ema_model.state_dict(), closed_form(recorder.steps, smoothing=smoothing))


def assert_starts_at(averages: AverageRecorder, steps: StepRecorder, first: int) -> None:
    """The average is absent before optimizer step ``first``, a copy of its weights there, then the closed form."""
    assert sorted(averages.steps) == sorted(steps.steps)
    for step, (_, average) in averages.steps.items():
        if step < first:
            assert average is None, f"the average started at step {step}, before step {first}"
            continue
        assert average is not None, f"the average has not started at step {step}"
        expected = closed_form({s: w for s, w in steps.steps.items() if first <= s <= step})
        if step == first:  # a copy of the weights, bit for bit
            for name, value in expected.items():
                assert torch.equal(average[name], value), name
        assert_close_to(average, expected)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_start_in_epochs_starts_at_the_first_optimizer_step_of_that_epoch(tmp_path, accumulate):
    ema = EMACallback(smoothing=SMOOTHING, ema_start="2ep")
    steps, averages = StepRecorder(), AverageRecorder(ema)
    trainer = make_trainer(
        tmp_path, [steps, ema, averages], max_epochs=4, accumulate_grad_batches=accumulate, enable_checkpointing=False
    )
    trainer.fit(TinyModule(), loader(1), loader(2))  # validation runs on the training weights until the start
    per_epoch = 6 // accumulate  # 6 batches an epoch
    first = 2 * per_epoch + 1
    assert averages.steps[first][0] == 2 and averages.steps[first - 1][0] == 1  # the first step of epoch 2
    assert_starts_at(averages, steps, first)
    assert ema.ema.num_updates == 2 * per_epoch


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_start_in_dur_starts_at_that_fraction_of_the_optimizer_steps(tmp_path, accumulate):
    ema = EMACallback(smoothing=SMOOTHING, ema_start="0.25dur")
    steps, averages = StepRecorder(), AverageRecorder(ema)
    trainer = make_trainer(tmp_path, [steps, ema, averages], accumulate_grad_batches=accumulate)
    trainer.fit(TinyModule(), loader(1), loader(2))
    total = 12 // accumulate  # 2 epochs of 6 batches
    first = math.ceil(0.25 * total)  # 3 of 12 steps, or 2 of 6 (step 1.5 is not reached before step 2)
    assert_starts_at(averages, steps, first)
    assert ema.ema.num_updates == total - first + 1


def test_a_second_fit_with_the_same_callback_continues_the_average(tmp_path):
    ema, module = EMACallback(smoothing=SMOOTHING), TinyModule()
    first, second = StepRecorder(), StepRecorder()
    make_trainer(tmp_path / "a", [first, ema], max_epochs=1, enable_checkpointing=False).fit(module, loader(1))
    trainer = make_trainer(tmp_path / "b", [second, ema], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, loader(3), loader(2))
    assert (len(first.steps), len(second.steps)) == (6, 6)
    assert ema.ema.num_updates == 12  # each fit counts its own optimizer steps
    assert_close_to(ema.ema_model.state_dict(), closed_form(first.steps, second.steps))
    assert_close_to(weights64(module), second.steps[6])


def test_validation_and_test_use_the_average(tmp_path):
    ema = EMACallback(smoothing=SMOOTHING)
    module = TinyModule()
    trainer = make_trainer(tmp_path, [ema], enable_checkpointing=False)
    trainer.fit(module, loader(1))
    plain = copy.deepcopy(module)
    plain.load_state_dict(ema.ema_model.state_dict())
    plain.eval()
    x, y = loader(2).dataset.tensors
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(plain(x), y))
        training = float(nn.functional.cross_entropy(module.eval()(x), y))
    validated = trainer.validate(module, loader(2), verbose=False)[0]["val_loss"]
    tested = trainer.test(module, loader(2), verbose=False)[0]["val_loss"]
    assert validated == pytest.approx(expected, rel=1e-5)
    assert tested == pytest.approx(expected, rel=1e-5)
    assert validated != pytest.approx(training, rel=1e-3)
    assert not ema.ema.shadow.swapped


def validation_losses(module: TinyModule, ema: EMACallback) -> tuple[float, float]:
    """The validation loss of the average and of the training weights, computed without Lightning."""
    plain = copy.deepcopy(module)
    plain.load_state_dict(ema.ema_model.state_dict())
    x, y = loader(2).dataset.tensors
    with torch.no_grad():
        average = float(nn.functional.cross_entropy(plain.eval()(x), y))
        training = float(nn.functional.cross_entropy(copy.deepcopy(module).eval()(x), y))
    assert average != pytest.approx(training, rel=1e-3)
    return average, training


def test_eval_weights_training_validates_the_training_weights_under_the_modules_names(tmp_path):
    ema, module = EMACallback(smoothing=SMOOTHING, eval_weights="training"), TinyModule()
    trainer = make_trainer(tmp_path, [ema], enable_checkpointing=False)
    trainer.fit(module, loader(1))
    average, training = validation_losses(module, ema)
    assert trainer.validate(module, loader(2), verbose=False) == [{"val_loss": pytest.approx(training, rel=1e-5)}]
    ema.eval_weights = "ema"  # the other weights: validate again
    assert trainer.validate(module, loader(2), verbose=False) == [{"val_loss": pytest.approx(average, rel=1e-5)}]
    assert not ema.ema.shadow.swapped


@pytest.mark.parametrize(("old", "new"), [(True, "ema"), (False, "training")])
def test_evaluate_with_ema_is_deprecated_and_means_eval_weights(tmp_path, old, new):
    message = rf"EMACallback\(evaluate_with_ema={old}\) is deprecated.*use EMACallback\(eval_weights='{new}'\)"
    with pytest.warns(DeprecationWarning, match=message) as warned:
        ema = EMACallback(smoothing=SMOOTHING, evaluate_with_ema=old)
    assert warned[0].filename == __file__
    assert ema.eval_weights == new
    module = TinyModule()
    trainer = make_trainer(tmp_path, [ema], enable_checkpointing=False)
    trainer.fit(module, loader(1))
    average, training = validation_losses(module, ema)
    expected = average if new == "ema" else training
    assert trainer.validate(module, loader(2), verbose=False)[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.warns(DeprecationWarning, match=r"EMACallback.evaluate_with_ema is deprecated.*\.eval_weights"):
        assert ema.evaluate_with_ema is old
    with pytest.warns(DeprecationWarning, match="evaluate_with_ema"):
        ema.evaluate_with_ema = not old
    assert ema.eval_weights == ("training" if new == "ema" else "ema")


def test_eval_weights_both_is_refused_in_lightning_saying_why():
    with pytest.raises(ValueError, match=r"eval_weights='both'\) is not supported in Lightning: .*validation_step"):
        EMACallback(half_life="10ba", eval_weights="both")
    with pytest.raises(ValueError, match=r"eval_weights='average' must be one of 'ema', 'training'$"):
        EMACallback(half_life="10ba", eval_weights="average")
    with pytest.raises(ValueError, match="evaluate_with_ema='yes' must be one of True, False"):
        EMACallback(half_life="10ba", evaluate_with_ema="yes")
    with pytest.raises(ValueError, match=r"evaluate_with_ema=False .* and eval_weights='both' disagree"):
        EMACallback(half_life="10ba", evaluate_with_ema=False, eval_weights="both")


class SaveDuringValidation(pl.Callback):
    """Writes a checkpoint from inside validation, while the average is swapped in (listed after the EMA)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.training: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.training is not None:
            return
        trainer.save_checkpoint(self.path)


def test_a_checkpoint_written_during_validation_holds_the_training_weights(tmp_path):
    recorder, ema, saver = StepRecorder(), EMACallback(smoothing=SMOOTHING), SaveDuringValidation(tmp_path / "v.ckpt")
    # closing hooks run in list order here: the saver runs before the EMA swaps out
    trainer = make_trainer(tmp_path, [recorder, saver, ema], max_epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader(1), loader(2))
    checkpoint = torch.load(tmp_path / "v.ckpt", weights_only=False)
    assert_close_to(checkpoint["state_dict"], recorder.steps[6])
    for name, value in checkpoint["state_dict"].items():
        if value.is_floating_point():
            assert torch.equal(value.double(), recorder.steps[6][name]), name


@pytest.mark.parametrize("late_restore", [False, True])
@pytest.mark.parametrize("rate", [{"smoothing": SMOOTHING}, {"half_life": "0.1dur"}])
def test_resume_from_a_checkpoint_is_bit_for_bit(tmp_path, rate, late_restore):
    """Also when the strategy restores the callback's state after on_fit_start (FSDP, DeepSpeed)."""

    def run(folder: Path, ckpt_path: Path | None = None) -> tuple[TinyModule, EMACallback]:
        module, ema = TinyModule(), EMACallback(**rate)
        saver = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
        strategy = {"strategy": LateRestoreStrategy(device="cpu")} if late_restore else {}
        trainer = make_trainer(folder, [ema, saver], max_epochs=3, **strategy)
        trainer.fit(module, loader(1), loader(2), ckpt_path=ckpt_path)
        return module, ema

    whole_module, whole_ema = run(tmp_path / "whole")
    first = tmp_path / "whole" / "epoch=0-step=6.ckpt"
    assert first.exists(), list((tmp_path / "whole").iterdir())
    resumed_module, resumed_ema = run(tmp_path / "resumed", ckpt_path=first)
    for name, value in whole_module.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[name], value), name
    for name, value in whole_ema.ema.state_dict()["weights"].items():
        assert torch.equal(resumed_ema.ema.state_dict()["weights"][name], value), name
    assert resumed_ema.ema.num_updates == whole_ema.ema.num_updates == 18
    assert resumed_ema.ema.smoothing == whole_ema.ema.smoothing  # "0.1dur" of 18 steps: 1.8 batches


class SaveAtStep(pl.Callback):
    """Writes a checkpoint in on_train_batch_end of one optimizer step; listed before the EMA, so before it averages."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
def test_resume_from_a_checkpoint_written_before_the_step_was_averaged(tmp_path):
    """The checkpoint holds step 4's weights and an average of steps 1-3: resuming averages step 4 first."""
    first, path = StepRecorder(), tmp_path / "step4.ckpt"
    make_trainer(
        tmp_path / "a", [first, SaveAtStep(path, 4), EMACallback(smoothing=SMOOTHING)], enable_checkpointing=False
    ).fit(TinyModule(), loader(1))
    assert torch.load(path, weights_only=False)["global_step"] == 4
    resumed, ema = StepRecorder(), EMACallback(smoothing=SMOOTHING)
    make_trainer(tmp_path / "b", [resumed, ema], enable_checkpointing=False).fit(
        TinyModule(), loader(1), ckpt_path=path
    )
    assert min(resumed.steps) == 5
    before = {step: weights for step, weights in first.steps.items() if step <= 4}
    assert ema.ema.num_updates == 4 + len(resumed.steps)
    assert_close_to(ema.ema_model.state_dict(), closed_form(before, resumed.steps))


def test_save_ema_weights_loads_into_a_plain_module(tmp_path):
    from safetensors.torch import load_file

    ema = EMACallback(smoothing=SMOOTHING)
    module = TinyModule()
    make_trainer(tmp_path, [ema], enable_checkpointing=False).fit(module, loader(1))
    path = ema.save_ema_weights(tmp_path / "ema.safetensors")
    plain = TinyModule()
    plain.load_state_dict(load_file(path))
    for name, value in ema.ema_model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def test_bad_arguments_are_refused():
    from emakit import EMA

    with pytest.raises(ValueError, match="not both"):
        EMACallback(EMA(smoothing=0.9), smoothing=0.9)
    with pytest.raises(ValueError, match=r"must be an emakit\.EMA"):
        EMACallback("ema")
    with pytest.raises(ValueError, match="half_life"):
        EMACallback(half_life="-3ba")


def test_ddp_on_two_processes_keeps_the_averages_identical(tmp_path):
    """Parameters are equal on every rank under DDP, and so are their averages. (BatchNorm statistics are not:
    DDP leaves each rank its own until the next forward broadcasts rank 0's, so the script's module has none.)"""
    result = torchrun(DDP_SCRIPT, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 6
    for name, value in ranks[0]["average"].items():
        assert torch.equal(ranks[1]["average"][name], value), name
    assert_close_to(ranks[0]["average"], closed_form(ranks[0]["steps"]))


def test_save_best_average_under_ddp_saves_the_average_and_resumes_every_rank_bit_for_bit(tmp_path):
    """Two processes, ``strategy="ddp"``: the first epoch's checkpoint holds the average where the module's weights go
    and the training weights in the callback's state; resumed from it, both ranks end with the training weights and
    average of the uninterrupted run."""
    from emakit.integrations.lightning_best import TRAINING_KEY

    result = torchrun(DDP_SCRIPT, str(tmp_path), "save_best", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"save_best-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    checkpoint = torch.load(tmp_path / "whole" / ranks[0]["first"], weights_only=False)
    saved = checkpoint["callbacks"][ranks[0]["state_key"]]
    average = saved["ema"]["weights"]
    assert set(average) == set(checkpoint["state_dict"]) == set(saved[TRAINING_KEY])
    for name, value in average.items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
    assert not torch.equal(saved[TRAINING_KEY]["net.0.weight"], average["net.0.weight"])
    for rank in ranks:
        for what in ("training", "average"):
            for name, value in ranks[0][f"whole_{what}"].items():
                assert torch.equal(rank[f"whole_{what}"][name], value), (what, name)  # the ranks agree
                assert torch.equal(rank[f"resumed_{what}"][name], value), (what, name)  # resumed = uninterrupted


def test_the_docs_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "docs" / "integrations" / "lightning.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "lightning.md", "exec"), namespace)
    assert (tmp_path / "ema.safetensors").exists()
    assert namespace["ema"].ema.num_updates == 16


def test_import_emakit_imports_no_integration_package():
    import subprocess
    import sys

    code = (
        "import sys, emakit; print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ end_with
class SaveOnTrainEnd(pl.Callback):
    """Writes a checkpoint in on_train_end (listed after the EMA), as ModelCheckpoint(save_last=True) may."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("end_with", ["training", "average"])
def test_end_with_says_what_the_module_holds_after_fit_and_checkpoints_keep_the_training_weights(tmp_path, end_with):
    recorder, ema, module = StepRecorder(), EMACallback(smoothing=SMOOTHING, end_with=end_with), TinyModule()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(tmp_path, [recorder, ema, saver, SaveOnTrainEnd(tmp_path / "end.ckpt")], max_epochs=2)
    trainer.fit(module, loader(1), loader(2))
    last = recorder.steps[trainer.global_step]
    expected = closed_form(recorder.steps) if end_with == "average" else last
    assert_close_to(weights64(module), expected)
    if end_with == "average":
        assert not torch.allclose(weights64(module)["net.0.weight"], last["net.0.weight"])
        for name, value in ema.ema_model.state_dict().items():
            assert torch.equal(module.state_dict()[name], value), name
    else:
        for name, value in last.items():
            assert torch.equal(weights64(module)[name], value), name
    for path in (tmp_path / "ckpt" / "last.ckpt", tmp_path / "end.ckpt"):  # the last epoch's, on_train_end's
        checkpoint = torch.load(path, weights_only=False)
        for name, value in last.items():
            assert torch.equal(checkpoint["state_dict"][name].double(), value), (path.name, name)


def test_end_with_average_before_the_average_started_warns_and_keeps_the_training_weights(tmp_path):
    recorder, ema, module = (
        StepRecorder(),
        EMACallback(smoothing=SMOOTHING, ema_start="5ep", end_with="average"),
        TinyModule(),
    )
    trainer = make_trainer(tmp_path, [recorder, ema], enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"end_with='average'\): the average has not started \(ema_start='5ep'"):
        trainer.fit(module, loader(1))
    for name, value in recorder.steps[12].items():
        assert torch.equal(weights64(module)[name], value), name


def test_end_with_and_save_best_refuse_other_values():
    with pytest.raises(ValueError, match=r"end_with='ema'\): must be one of 'training', 'average'$"):
        EMACallback(smoothing=SMOOTHING, end_with="ema")
    with pytest.raises(ValueError, match=r"save_best='best'\): must be one of 'training', 'average'$"):
        EMACallback(smoothing=SMOOTHING, save_best="best")


def test_the_state_key_of_existing_configurations_is_unchanged():
    """Old checkpoints find their state by this key: new options enter it only when not at their default."""
    assert EMACallback(smoothing=SMOOTHING).state_key == "EMACallback{'smoothing': 0.8, 'update_interval': '1ba'}"
    same = EMACallback(smoothing=SMOOTHING, end_with="average", save_best="average")
    assert same.state_key == "EMACallback{'smoothing': 0.8, 'update_interval': '1ba'}"
    assert EMACallback(half_life="0.1dur").state_key == "EMACallback{'smoothing': '0.1dur', 'update_interval': '1ba'}"


def test_callbacks_of_uniform_windowed_and_scheduled_averages_keep_their_states_apart():
    """Without an exponential smoothing of their own, these share ``smoothing=None``: their averages' labels tell them
    apart, so two of them in one Trainer resume each its own state."""
    from emakit.schedules import cosine

    callbacks = [
        EMACallback(average="uniform"),
        EMACallback(window="100ba"),
        EMACallback(window="200ba"),
        EMACallback(schedule=cosine(start=0.9, end=1.0)),
        EMACallback(smoothing=SMOOTHING, window="100ba", average=["exponential", "window"]),
        EMACallback(smoothing=SMOOTHING),
    ]
    keys = [callback.state_key for callback in callbacks]
    assert len(set(keys)) == len(keys), keys
    assert keys[1] == "EMACallback{'smoothing': None, 'update_interval': '1ba', 'averages': 'window@100ba'}"


# ------------------------------------------------------------- should_update
@pytest.mark.parametrize(
    ("rule", "chosen"),
    [
        (lambda step, epoch: step % 3 == 0, lambda step, epoch: step % 3 == 0),
        (lambda step, epoch: epoch >= 1, lambda step, epoch: epoch >= 1),
    ],
    ids=["every third step", "from epoch 1"],
)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_should_update_chooses_the_optimizer_steps_that_update(tmp_path, rule, chosen, accumulate):
    asked: list[tuple[int, int]] = []

    def should_update(step: int, epoch: int) -> bool:
        asked.append((step, epoch))
        return rule(step, epoch)

    recorder, ema = StepRecorder(), EMACallback(smoothing=SMOOTHING, should_update=should_update)
    trainer = make_trainer(tmp_path, [recorder, ema], accumulate_grad_batches=accumulate, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader(1), loader(2))
    per_epoch = 6 // accumulate
    assert asked == [(step, (step - 1) // per_epoch) for step in range(1, 2 * per_epoch + 1)]
    updated = {step: w for step, w in recorder.steps.items() if chosen(step, (step - 1) // per_epoch)}
    assert ema.ema.num_updates == len(updated) < len(recorder.steps)
    assert_close_to(ema.ema_model.state_dict(), closed_form(updated))  # each True: one update with the smoothing


def test_should_update_starts_at_the_first_true_at_or_after_ema_start(tmp_path):
    recorder = StepRecorder()
    ema = EMACallback(smoothing=SMOOTHING, ema_start="5ba", should_update=lambda step, epoch: step % 2 == 0)
    make_trainer(tmp_path, [recorder, ema], enable_checkpointing=False).fit(TinyModule(), loader(1))
    updated = {step: w for step, w in recorder.steps.items() if step >= 5 and step % 2 == 0}
    assert sorted(updated) == [6, 8, 10, 12] and ema.ema.num_updates == 4
    assert_close_to(ema.ema_model.state_dict(), closed_form(updated))


def test_should_update_refuses_an_update_interval_it_would_contradict():
    def every_other(step: int, epoch: int) -> bool:
        return step % 2 == 0

    with pytest.raises(
        ValueError, match=r"replaces update_interval's rule, so update_interval must be '1ba' \(got '2ba'"
    ):
        EMACallback(half_life="10ba", update_interval="2ba", should_update=every_other)
    with pytest.raises(ValueError, match=r"update_interval must be '1ba' \(got '1ep'"):
        EMACallback(half_life="2ep", should_update=every_other)
    with pytest.raises(ValueError, match=r"should_update=3 must be a callable \(step, epoch\) -> bool"):
        EMACallback(smoothing=SMOOTHING, should_update=3)
    key = EMACallback(smoothing=SMOOTHING, should_update=every_other).state_key
    assert key.endswith(
        "'should_update': 'test_should_update_refuses_an_update_interval_it_would_contradict.<locals>.every_other'}"
    )


# ------------------------------------------------------ update_interval in ep
class EpochRecorder(pl.Callback):
    """The module's weights at each epoch's end (after its last optimizer step)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs[trainer.current_epoch] = weights64(pl_module)


class ValidatedAverage(pl.Callback):
    """The average validation measures (listed after the EMA, which swapped it in), by epoch."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs[trainer.current_epoch] = weights64(pl_module)


@pytest.mark.parametrize(
    ("arguments", "smoothing", "every"),
    [
        ({"half_life": "2ep", "update_interval": "1ep"}, 2**-0.5, 1),
        ({"half_life": "2ep"}, 2**-0.5, 1),  # update_interval defaults to 1 of the half-life's unit
        ({"smoothing": SMOOTHING, "update_interval": "1ep"}, SMOOTHING, 1),
        ({"smoothing": SMOOTHING, "update_interval": "2ep"}, SMOOTHING, 2),
    ],
)
@pytest.mark.parametrize("limit", [None, 4])
def test_update_interval_in_epochs_updates_at_epoch_ends(tmp_path, arguments, smoothing, every, limit):
    epochs, ema, validated = EpochRecorder(), EMACallback(**arguments), ValidatedAverage()
    trainer = make_trainer(
        tmp_path, [epochs, ema, validated], max_epochs=4, limit_train_batches=limit, enable_checkpointing=False
    )
    trainer.fit(TinyModule(), loader(1), loader(2))
    assert trainer.global_step == 4 * (limit or 6)
    due = {epoch: w for epoch, w in epochs.epochs.items() if (epoch + 1) % every == 0}
    assert ema.ema.num_updates == len(due) == 4 // every
    assert ema.ema.smoothing == smoothing
    assert_close_to(ema.ema_model.state_dict(), closed_form(due, smoothing=smoothing))
    # the epoch-end validation (before on_train_epoch_end) measures the average with that epoch's update in it
    for epoch, average in validated.epochs.items():
        if epoch + 1 >= every:
            upto = {e: w for e, w in due.items() if e <= epoch}
            assert_close_to(average, closed_form(upto, smoothing=smoothing))


def test_update_interval_in_epochs_updates_an_epoch_cut_short_at_its_end(tmp_path):
    epochs, ema = EpochRecorder(), EMACallback(smoothing=SMOOTHING, update_interval="1ep")
    trainer = make_trainer(tmp_path, [epochs, ema], max_epochs=4, max_steps=9, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader(1))
    assert trainer.global_step == 9 and sorted(epochs.epochs) == [0, 1]
    assert ema.ema.num_updates == 2
    assert_close_to(ema.ema_model.state_dict(), closed_form(epochs.epochs))


def test_update_interval_in_epochs_with_ema_start_in_epochs(tmp_path):
    epochs, ema = EpochRecorder(), EMACallback(smoothing=SMOOTHING, update_interval="1ep", ema_start="2ep")
    make_trainer(tmp_path, [epochs, ema], max_epochs=4, enable_checkpointing=False).fit(TinyModule(), loader(1))
    assert ema.ema.num_updates == 3  # the ends of epochs 1, 2, 3: two epochs done at the first
    assert_close_to(ema.ema_model.state_dict(), closed_form({e: epochs.epochs[e] for e in (1, 2, 3)}))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_update_interval_in_epochs_resumes_bit_for_bit(tmp_path):
    def run(folder: Path, ckpt_path: Path | None = None) -> tuple[TinyModule, EMACallback]:
        module, ema = TinyModule(), EMACallback(half_life="2ep", update_interval="1ep")
        saver = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
        make_trainer(folder, [ema, saver], max_epochs=3).fit(module, loader(1), loader(2), ckpt_path=ckpt_path)
        return module, ema

    whole_module, whole_ema = run(tmp_path / "whole")
    resumed_module, resumed_ema = run(tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "epoch=0-step=6.ckpt")
    assert resumed_ema.ema.num_updates == whole_ema.ema.num_updates == 3
    for name, value in whole_module.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[name], value), name
    for name, value in whole_ema.ema.state_dict()["weights"].items():
        assert torch.equal(resumed_ema.ema.state_dict()["weights"][name], value), name


def test_a_half_life_in_batches_with_an_interval_in_epochs_is_refused():
    with pytest.raises(ValueError, match=r"update_interval='1ep' and half_life='10ba' must share a unit"):
        EMACallback(half_life="10ba", update_interval="1ep")
    with pytest.raises(ValueError, match=r"must share a unit \('ba' for a half-life in 'dur'\)"):
        EMACallback(half_life="0.1dur", update_interval="1ep")


# ----------------------------------------------------------------- save_best
def save_best_run(
    folder: Path, ema_start: str | None = None, ckpt_path: Path | None = None, save_best: str = "average"
) -> tuple[TinyModule, EMACallback, StepRecorder, AverageRecorder, pl.callbacks.ModelCheckpoint]:
    """Three epochs validated on the average; the best epoch kept by val_loss, and every epoch's checkpoint."""
    start = {} if ema_start is None else {"ema_start": ema_start}
    module, ema = TinyModule(), EMACallback(smoothing=SMOOTHING, save_best=save_best, **start)
    steps, averages = StepRecorder(), AverageRecorder(ema)
    best = pl.callbacks.ModelCheckpoint(dirpath=folder / "best", monitor="val_loss", save_top_k=1)
    every = pl.callbacks.ModelCheckpoint(dirpath=folder / "every", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(folder, [steps, ema, averages, best, every], max_epochs=3)
    trainer.fit(module, loader(1), loader(2), ckpt_path=ckpt_path)
    return module, ema, steps, averages, best


def test_save_best_average_keeps_the_average_that_validation_ranked(tmp_path):
    from emakit.integrations.lightning_best import TRAINING_KEY

    _, ema, steps, averages, best = save_best_run(tmp_path)
    checkpoint = torch.load(best.best_model_path, weights_only=False)
    step = checkpoint["global_step"]
    average, training = averages.steps[step][1], steps.steps[step]
    assert average is not None
    saved_training = checkpoint["callbacks"][ema.state_key][TRAINING_KEY]
    for name, value in average.items():
        assert torch.equal(checkpoint["state_dict"][name].double(), value), name
        assert torch.equal(saved_training[name].double(), training[name]), name
    assert not torch.equal(checkpoint["state_dict"]["net.0.weight"].double(), training["net.0.weight"])
    ranked = TinyModule.load_from_checkpoint(best.best_model_path)  # they score what the checkpoint was ranked by
    for name, value in average.items():
        assert torch.equal(ranked.state_dict()[name].double(), value), name
    x, y = loader(2).dataset.tensors
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(ranked.eval()(x), y))
    assert loss == pytest.approx(float(best.best_model_score), rel=1e-5)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("ema_start", [None, "1ep"])
def test_save_best_average_resumes_bit_for_bit_from_each_checkpoint(tmp_path, ema_start):
    from emakit.integrations.lightning_best import TRAINING_KEY

    whole_module, whole_ema, whole_steps, _, best = save_best_run(tmp_path / "whole", ema_start)
    paths = sorted((tmp_path / "whole" / "every").glob("*.ckpt"))
    assert [p.name for p in paths] == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "epoch=2-step=18.ckpt"]
    first = torch.load(paths[0], weights_only=False)
    if ema_start == "1ep":  # not started: validation measured the training weights, and the checkpoint holds them
        assert TRAINING_KEY not in first["callbacks"][whole_ema.state_key]
        for name, value in whole_steps.steps[6].items():
            assert torch.equal(first["state_dict"][name].double(), value), name
    else:
        assert TRAINING_KEY in first["callbacks"][whole_ema.state_key]
    for index, path in enumerate([*paths[:2], Path(best.best_model_path)]):
        module, ema, *_ = save_best_run(tmp_path / f"resumed{index}", ema_start, ckpt_path=path)
        for name, value in whole_module.state_dict().items():
            assert torch.equal(module.state_dict()[name], value), (path.name, name)
        for name, value in whole_ema.ema.state_dict()["weights"].items():
            assert torch.equal(ema.ema.state_dict()["weights"][name], value), (path.name, name)
        assert ema.ema.num_updates == whole_ema.ema.num_updates


def test_save_best_training_keeps_the_training_weights(tmp_path):
    _, ema, steps, _, best = save_best_run(tmp_path, save_best="training")
    checkpoint = torch.load(best.best_model_path, weights_only=False)
    assert "training_state_dict" not in checkpoint["callbacks"][ema.state_key]
    for name, value in steps.steps[checkpoint["global_step"]].items():
        assert torch.equal(checkpoint["state_dict"][name].double(), value), name


def test_save_best_average_is_refused_under_a_sharding_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match=r"save_best='average'\) is not supported under ModelParallelStrategy"):
        EMACallback(smoothing=SMOOTHING, save_best="average").setup(trainer, TinyModule(), "fit")
    EMACallback(smoothing=SMOOTHING).setup(trainer, TinyModule(), "fit")  # the default is fine


def test_save_best_average_during_validation_saves_the_average_and_the_training_weights(tmp_path):
    from emakit.integrations.lightning_best import TRAINING_KEY

    recorder, saver = StepRecorder(), SaveDuringValidation(tmp_path / "v.ckpt")
    ema = EMACallback(smoothing=SMOOTHING, save_best="average")
    trainer = make_trainer(tmp_path, [recorder, saver, ema], max_epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModule(), loader(1), loader(2))  # the saver runs while the average is swapped in
    checkpoint = torch.load(tmp_path / "v.ckpt", weights_only=False)
    average = weights64(ema.ema_model)
    for name, value in recorder.steps[6].items():
        assert torch.equal(checkpoint["state_dict"][name].double(), average[name]), name
        assert torch.equal(checkpoint["callbacks"][ema.state_key][TRAINING_KEY][name].double(), value), name
    assert not ema.ema.swapped
