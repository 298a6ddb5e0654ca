"""Exporting EMA weights as safetensors, by ``EMA.save_ema_weights`` and ``emakit export``; and the EMA's guards
against being silently wrong: wrapper name prefixes, non-finite weights, a start beyond the run, nothing to average.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit import EMA, Classifier, PostHocEMA, Trainer
from emakit.cli import main as emakit_main
from emakit.trainer.checkpoint import list_checkpoints


# ----------------------------------------------------------------------------- helpers
class TiedNet(nn.Module):
    """Tied weights (the head is the embedding), BatchNorm buffers, and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


def make_tied(seed: int = 0) -> TiedNet:
    torch.manual_seed(seed)
    return TiedNet()


@torch.no_grad()
def step(model: nn.Module, seed: int) -> None:
    """An optimizer step's worth of change to every parameter, and a train-mode forward (moves BatchNorm buffers)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.train()
    model(torch.randint(0, 6, (8,), generator=generator))


def trained_ema(model: nn.Module, updates: int = 4, wrapped: nn.Module | None = None, **kwargs) -> EMA:
    """An EMA updated ``updates`` times, each after a step of ``model``, through ``wrapped`` when given."""
    ema = EMA(**{"half_life": "2ba", **kwargs})
    for seed in range(updates):
        step(model, seed)
        ema.update(wrapped if wrapped is not None else model)
    return ema


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator))
    return DataLoader(data, batch_size=4)


def make_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)))


def train(folder: Path, algorithms: list, max_duration: str = "6ba", **kwargs) -> tuple[Trainer, Path]:
    """Train a classifier with ``algorithms``, checkpointing at the end; returns the trainer and the checkpoint."""
    trainer = Trainer(
        model=make_classifier(),
        train_dataloader=loader(),
        max_duration=max_duration,
        algorithms=algorithms,
        save_folder=folder,
        save_interval=max_duration,
        progress_bar=False,
        seed=0,
        **kwargs,
    )
    trainer.fit()
    return trainer, list_checkpoints(folder)[-1]


# ------------------------------------------------------------------------ save_ema_weights
def test_save_ema_weights_writes_the_models_state_dict_keys_and_loads_into_a_fresh_model(tmp_path):
    model = make_tied()
    ema = trained_ema(model)
    path = ema.save_ema_weights(tmp_path / "ema.safetensors")
    assert path == tmp_path / "ema.safetensors"
    tensors = load_file(path)
    assert set(tensors) == set(model.state_dict())
    tied_and_buffers = {"embed.weight", "head.weight", "norm.running_mean", "norm.running_var"}
    assert tied_and_buffers <= set(tensors)
    fresh = make_tied(seed=1)
    fresh.load_state_dict(load_file(path))  # strict: every key of the model, no other
    expected = snapshot(ema.ema_model)
    assert_same(expected, snapshot(fresh))
    assert not torch.equal(expected["embed.weight"], model.embed.weight), "the EMA equals the model: proves nothing"
    assert tensors["norm.num_batches_tracked"].dtype == torch.int64
    assert int(tensors["norm.num_batches_tracked"]) == 4


def test_save_ema_weights_before_the_ema_started_raises_and_writes_nothing(tmp_path):
    model = make_tied()
    path = tmp_path / "ema.safetensors"
    with pytest.raises(ValueError, match="not started"):
        EMA(half_life="2ba").save_ema_weights(path)
    late = trained_ema(model, updates=2, ema_start="5ba")
    assert not late.started
    with pytest.raises(ValueError, match="not started"):
        late.save_ema_weights(path)
    assert not path.exists()


def test_save_ema_weights_of_an_ema_loaded_from_a_state_writes_every_tensor(tmp_path):
    """A resumed EMA that has not updated since must export the same file as the EMA it was saved from."""
    model = make_tied()
    ema = trained_ema(model)
    fresh = EMA(half_life="2ba")
    fresh.load_state_dict(ema.state_dict())
    ema.save_ema_weights(tmp_path / "original.safetensors")
    fresh.save_ema_weights(tmp_path / "resumed.safetensors")
    assert_same(load_file(tmp_path / "original.safetensors"), load_file(tmp_path / "resumed.safetensors"))


# --------------------------------------------------------------------------- emakit export
def test_emakit_export_of_a_checkpoint_matches_save_ema_weights_bit_for_bit(tmp_path, capsys):
    ema = EMA(half_life="3ba")
    trainer, checkpoint = train(tmp_path / "run", [ema])
    direct = ema.save_ema_weights(tmp_path / "direct.safetensors")
    out = tmp_path / "exported.safetensors"
    assert emakit_main(["export", str(checkpoint), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    exported = load_file(out)
    assert_same(load_file(direct), exported)
    assert set(exported) == set(trainer.state.model.state_dict())
    fresh = make_classifier(seed=4)
    fresh.load_state_dict(exported)
    assert_same(snapshot(ema.ema_model), snapshot(fresh))


def test_emakit_export_index_picks_among_several_emas(tmp_path):
    emas = [EMA(half_life="1ba"), EMA(half_life="5ba")]
    _, checkpoint = train(tmp_path / "run", emas)
    for index, ema in enumerate(emas):
        out = tmp_path / f"ema{index}.safetensors"
        emakit_main(["export", str(checkpoint), str(out), "--index", str(index)])
        assert_same(snapshot(ema.ema_model), load_file(out))
    first, second = (load_file(tmp_path / f"ema{index}.safetensors") for index in range(2))
    assert not torch.equal(first["module.0.weight"], second["module.0.weight"])


def test_emakit_export_counts_only_the_emas_of_a_run_with_a_posthoc_ema_too(tmp_path):
    """PostHocEMA's state also names the model's keys; its averages are exported by ``emakit posthoc``, not here."""
    ema = EMA(half_life="3ba")
    _, checkpoint = train(tmp_path / "run", [PostHocEMA(snapshot_interval="2ba", folder=tmp_path / "phema"), ema])
    out = tmp_path / "exported.safetensors"
    assert emakit_main(["export", str(checkpoint), str(out)]) == 0
    assert_same(snapshot(ema.ema_model), load_file(out))
    with pytest.raises(SystemExit, match=r"--index 1 is out of range: 1 EMA\(s\) saved"):
        emakit_main(["export", str(checkpoint), str(out), "--index", "1"])


@pytest.mark.parametrize("index", [1, 5, -1])
def test_emakit_export_with_an_index_out_of_range_fails_clearly(tmp_path, index):
    _, checkpoint = train(tmp_path / "run", [EMA(half_life="2ba")], max_duration="2ba")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit, match=rf"--index {index} is out of range: 1 EMA\(s\) saved"):
        emakit_main(["export", str(checkpoint), str(out), "--index", str(index)])
    assert not out.exists()


def test_emakit_export_of_a_checkpoint_without_an_ema_fails_clearly(tmp_path):
    _, checkpoint = train(tmp_path / "run", [], max_duration="2ba")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit, match=re.escape(repr(str(checkpoint))) + " holds no EMA state"):
        emakit_main(["export", str(checkpoint), str(out)])
    assert not out.exists()


def test_emakit_export_of_a_checkpoint_from_before_the_ema_started_fails_clearly(tmp_path):
    with pytest.warns(UserWarning, match="never start"):
        _, checkpoint = train(tmp_path / "run", [EMA(half_life="2ba", ema_start="10ba")], max_duration="2ba")
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="not started"):
        emakit_main(["export", str(checkpoint), str(out)])
    assert not out.exists()


def test_emakit_export_of_a_checkpoint_written_after_a_resume_before_the_next_update_holds_every_tensor(tmp_path):
    """The EMA updates every 4 batches; the run resumes at batch 5 and checkpoints at 6, before the next update."""
    ema = EMA(half_life="4ba", update_interval="4ba")
    first_run, first = train(tmp_path / "first", [ema], max_duration="5ba")
    assert first_run.state.timestamp.batch == 5 and ema.num_updates == 1
    expected = snapshot(ema.ema_model)
    resumed_ema = EMA(half_life="4ba", update_interval="4ba")
    _, second = train(tmp_path / "second", [resumed_ema], max_duration="6ba", load_path=first)
    out = tmp_path / "out.safetensors"
    emakit_main(["export", str(second), str(out)])
    assert_same(expected, load_file(out))


# -------------------------------------------------------------------------- wrapped models
class Wrapper(nn.Module):
    """Names its model's tensors ``module.<name>``, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_ema_state_of_a_compiled_model_loads_into_the_plain_model_and_exports_its_keys(tmp_path):
    """torch.compile names every tensor ``_orig_mod.<name>``; the EMA's names are the plain model's.

    The compiled module is never called: its names are there from the start, and compiling costs seconds.
    """
    model = make_tied()
    compiled = torch.compile(model, backend="aot_eager")
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    ema = trained_ema(model, wrapped=compiled)
    path = ema.save_ema_weights(tmp_path / "ema.safetensors")
    assert set(load_file(path)) == set(model.state_dict())

    plain = make_tied(seed=1)
    fresh = EMA(half_life="2ba")
    fresh.load_state_dict(ema.state_dict())
    with fresh.ema_weights(plain):
        assert_same(snapshot(ema.ema_model), snapshot(plain))


def test_ema_state_with_compile_prefixed_names_loads_into_the_plain_model():
    model = make_tied()
    ema = trained_ema(model)
    state = ema.state_dict()
    state["weights"] = {f"_orig_mod.{name}": t for name, t in state["weights"].items()}
    plain = make_tied(seed=1)
    fresh = EMA(half_life="2ba")
    fresh.load_state_dict(state)
    with fresh.ema_weights(plain):
        assert_same(snapshot(ema.ema_model), snapshot(plain))


def test_ema_state_of_a_model_with_module_prefixed_names_loads_into_the_plain_model(tmp_path):
    wrapped = Wrapper(make_tied())
    ema = trained_ema(wrapped)
    assert all(name.startswith("module.") for name in ema.state_dict()["weights"])
    plain = make_tied(seed=1)
    for fresh_start in (True, False):  # loaded before the EMA saw the model, and after
        fresh = EMA(half_life="2ba")
        if not fresh_start:
            fresh.update(plain)
        fresh.load_state_dict(ema.state_dict())
        with fresh.ema_weights(plain):
            assert_same(snapshot(ema.ema_model.module), snapshot(plain))


# ------------------------------------------------------------------------- non-finite values
def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize(("tensor", "value"), [("weight", math.nan), ("bias", math.inf), ("running_var", -math.inf)])
def test_skip_nonfinite_skips_an_update_with_a_nonfinite_weight_and_keeps_the_closed_form_of_the_others(tensor, value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layer = {"weight": model[0], "bias": model[0], "running_var": model[1]}[tensor]
    ema = EMA(half_life="1ba", skip_nonfinite=True)
    smoothing = 0.5
    expected: dict[str, torch.Tensor] | None = None
    for batch in range(1, 7):
        step_linear(model, batch)
        if batch in (1, 4):  # the first update event, and a later one
            saved = getattr(layer, tensor).detach().clone()
            with torch.no_grad():
                getattr(layer, tensor).view(-1)[1] = value
            with pytest.warns(RuntimeWarning, match="NaN or Inf"):
                assert ema.update(model) is False
            with torch.no_grad():
                getattr(layer, tensor).copy_(saved)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ema.update(model) is True
        current = weights64(model)
        if expected is None:
            expected = current
        else:
            expected = {k: smoothing * expected[k] + (1 - smoothing) * current[k] for k in current}
    assert ema.num_skipped == 2
    assert ema.num_updates == 4
    average = weights64(ema.ema_model)
    assert all(torch.isfinite(t).all() for t in average.values())
    for name, value64 in expected.items():
        torch.testing.assert_close(average[name], value64, atol=1e-6, rtol=1e-5, msg=name)


def step_linear(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
        model.train()
        model(torch.randn(5, 3, generator=generator))


def test_by_default_a_nan_weight_poisons_the_ema_and_stays():
    """skip_nonfinite=False is the default: the NaN is averaged in, and no later update removes it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    ema = EMA(half_life="1ba")
    assert ema.skip_nonfinite is False
    ema.update(model)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ema.update(model) is True
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    for _ in range(3):
        ema.update(model)
    average = ema.ema_model.weight
    assert torch.isnan(average[0, 0])
    assert torch.isfinite(average.view(-1)[1:]).all()
    assert ema.num_skipped == 0


# ------------------------------------------------------------------------------ never starts
@pytest.mark.parametrize(("ema_start", "max_duration"), [("20ba", "10ba"), ("3ep", "2ep"), ("9ba", "2ep")])
def test_an_ema_start_beyond_max_duration_warns_at_fit_start(ema_start, max_duration):
    ema = EMA(half_life="2ba", ema_start=ema_start)
    trainer = Trainer(make_classifier(), loader(), max_duration, algorithms=[ema], progress_bar=False, seed=0)
    with pytest.warns(UserWarning, match=re.escape(f"ema_start='{ema_start}'") + ".*never start"):
        trainer.fit()
    assert not ema.started


@pytest.mark.parametrize("ema_start", ["10ba", "8ba", "0.9dur", "2ep"])
def test_an_ema_start_within_max_duration_does_not_warn(ema_start):
    ema = EMA(smoothing=0.001, ema_start=ema_start)  # short enough for the one batch it may average
    trainer = Trainer(make_classifier(), loader(), "10ba", algorithms=[ema], progress_bar=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit()
    assert ema.started


# ---------------------------------------------------------------------- nothing to average
class Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.arange(3))


@pytest.mark.parametrize("make", [Counts, nn.ReLU, lambda: nn.Sequential(nn.Identity(), Counts())])
def test_a_model_without_floating_point_tensors_raises_and_counts_nothing(make):
    model = make()
    ema = EMA(half_life="2ba")
    with pytest.raises(ValueError, match="no floating-point parameters or buffers"):
        ema.update(model)
    assert not ema.started
    assert ema.batches_seen == 0 and ema.num_updates == 0
    assert ema.state_dict()["weights"] == {}
