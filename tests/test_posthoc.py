"""Post-hoc EMA against EDM2's closed forms: the profile, its width, the snapshot mix, and a reconstruction.

Expected averages come from tests/posthoc_reference.py: EDM2's formulas in float64, written without emakit.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from posthoc_reference import EDM2_GAMMAS, gamma_of, mixed, power_ema, snapshot_mix
from safetensors.torch import load_file
from torch import nn

from emakit import PostHocEMA
from emakit.algorithms.posthoc import (
    gamma_from_sigma_rel,
    sigma_rel_from_gamma,
    snapshot_coefficients,
    snapshots_in,
    synthesize,
)
from emakit.cli import main


class Trajectory(nn.Module):
    """Weights set from a known function of the step: several smooth waves and a trend."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=torch.float64))
        gen = torch.Generator().manual_seed(0)
        self.periods = 300 + 1500 * torch.rand(size, generator=gen, dtype=torch.float64)
        self.phases = 6.28 * torch.rand(size, generator=gen, dtype=torch.float64)

    @torch.no_grad()
    def at(self, step: int) -> None:
        self.weight.copy_(torch.sin(2 * math.pi * step / self.periods + self.phases) + step / 2000)


class WithBuffers(Trajectory):
    """A trajectory with a floating-point buffer (averaged) and an integer one (copied) too."""

    def __init__(self) -> None:
        super().__init__(size=6)
        self.register_buffer("offset", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def at(self, step: int) -> None:
        super().at(step)
        self.offset.copy_(torch.cos(step / torch.tensor([50.0, 80.0, 130.0], dtype=torch.float64)))
        self.count.fill_(step)


def run(
    phema: PostHocEMA, steps: int, model: nn.Module | None = None, history: dict | None = None, start: int = 1
) -> nn.Module:
    """Set the model to each step's weights and update; ``history`` gets a copy of the state after each step."""
    model = model or Trajectory()
    for step in range(start, steps + 1):
        model.at(step)
        if history is not None:
            history[step] = {key: value.clone() for key, value in model.state_dict().items()}
        phema.update(model)
    return model


def assert_is_the_power_ema(weights: dict, history: dict, times: list[int], sigma_rel: float, rtol: float) -> None:
    """``weights`` holds every key of the model, each the float64 closed form of the power-function EMA."""
    expected = power_ema(history, times, gamma_of(sigma_rel))
    assert list(weights) == list(expected), "a snapshot holds the model's state_dict keys, in order"
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[key].double(), value, rtol=rtol, atol=rtol, msg=key)
        else:
            assert torch.equal(weights[key], value), key


@pytest.mark.parametrize(("sigma_rel", "gamma"), list(EDM2_GAMMAS.items()))
def test_gamma_from_sigma_rel_is_edm2s_root(sigma_rel, gamma):
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=0.005)
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma_of(sigma_rel), rel=1e-9)  # the cubic's root
    assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("interval", [1, 10, 50])
def test_the_power_profile_does_not_depend_on_the_update_interval(interval, tmp_path):
    """With w_t = t the power-function EMA at T is (gamma + 1) / (gamma + 2) * T, whatever the update interval."""
    phema = PostHocEMA(
        sigma_rels=(0.10,), snapshot_interval="100000ba", folder=tmp_path, update_interval=f"{interval}ba"
    )
    model = nn.Linear(1, 1, bias=False).double()
    steps = 20_000
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(step)
        phema.update(model)
    gamma = gamma_of(0.10)
    average = phema.shadows[0].state_dict()["weight"].item()
    assert average / steps == pytest.approx((gamma + 1) / (gamma + 2), rel=2e-3)
    # and exactly the discrete closed form of the updates made
    history = {t: {"weight": torch.tensor([[float(t)]], dtype=torch.float64)} for t in range(1, steps + 1)}
    expected = power_ema(history, list(range(interval, steps + 1, interval)), gamma)["weight"].item()
    assert average == pytest.approx(expected, rel=1e-12)


def test_the_profile_products_match_numerical_integration():
    times, gammas = [400.0, 1000.0, 1000.0], [16.97, 6.94, 3.56]
    tau = torch.linspace(0, 1000, 2_000_001, dtype=torch.float64)[1:]

    def profile(t: float, g: float) -> torch.Tensor:
        return torch.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), torch.zeros_like(tau))

    # a target equal to one snapshot is that snapshot alone
    x = snapshot_coefficients(times, gammas, at=1000.0, gamma=6.94)
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    # and the mix for another target minimises the profiles' squared distance (checked on a grid)
    target = profile(800.0, 10.0)
    x = snapshot_coefficients(times, gammas, at=800.0, gamma=10.0)
    basis = torch.stack([profile(t, g) for t, g in zip(times, gammas)], dim=1)
    best = torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]
    torch.testing.assert_close(x, best / best.sum(), rtol=2e-3, atol=2e-4)


def test_a_tracked_width_is_reconstructed_from_the_others_within_one_percent(tmp_path):
    phema = PostHocEMA(sigma_rels=(0.05, 0.10, 0.15), snapshot_interval="100ba", folder=tmp_path)
    history: dict = {}
    run(phema, 4000, history=history)
    for at in (4000, 2000):  # at 2000: only the snapshots up to step 2000
        direct = power_ema(history, list(range(1, at + 1)), gamma_of(0.10))["weight"]
        synthesized = synthesize(tmp_path, 0.10, at=at, sources=(0.05, 0.15))["weight"]
        error = (synthesized - direct).norm() / direct.norm()
        assert error < 0.01, (at, float(error))


def test_snapshots_are_named_by_step_and_width_and_resume_is_exact(tmp_path):
    whole = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="50ba", folder=tmp_path / "whole")
    run(whole, 200)
    assert [(t, s) for t, s, _ in snapshots_in(tmp_path / "whole")] == [
        (t, s) for t in (50, 100, 150, 200) for s in (0.05, 0.10)
    ]
    first = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="50ba", folder=tmp_path / "resumed")
    model = run(first, 120)
    resumed = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="50ba", folder=tmp_path / "resumed")
    resumed.load_state_dict(first.state_dict())
    for step in range(121, 201):
        model.at(step)
        resumed.update(model)
    for a, b in zip(whole.shadows, resumed.shadows):
        assert torch.equal(a.state_dict()["weight"], b.state_dict()["weight"])


@pytest.mark.parametrize("split", [7, 8, 15])
def test_a_run_resumed_from_its_state_writes_the_uninterrupted_runs_snapshots(split, tmp_path):
    """Updates every 3 steps, snapshots every 4: resumed at ``split``, a run may owe a snapshot before an update."""
    kwargs = {"sigma_rels": (0.05, 0.10), "update_interval": "3ba", "snapshot_interval": "4ba"}
    history: dict = {}
    run(PostHocEMA(folder=tmp_path / "whole", **kwargs), 24, WithBuffers(), history)
    first = PostHocEMA(folder=tmp_path / "resumed", **kwargs)
    model = run(first, split, WithBuffers())
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    resumed = PostHocEMA(folder=tmp_path / "resumed", **kwargs)  # a new process: no model seen yet
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    run(resumed, 24, model, start=split + 1)
    found = snapshots_in(tmp_path / "whole")
    # snapshots at steps 4, 8, ..., 24, each named by its last update's step
    assert [(t, s) for t, s, _ in found] == [(t, s) for t in (3, 6, 12, 15, 18, 24) for s in (0.05, 0.10)]
    assert [p.name for _, _, p in snapshots_in(tmp_path / "resumed")] == [p.name for _, _, p in found]
    for t, sigma_rel, path in found:
        again = tmp_path / "resumed" / path.name
        assert again.read_bytes() == path.read_bytes(), f"{path.name} differs after resuming at step {split}"
        snapshot = torch.load(again, weights_only=True)
        assert (snapshot["t"], snapshot["sigma_rel"]) == (t, sigma_rel)
        assert list(snapshot["weights"]) == list(model.state_dict())
        assert_is_the_power_ema(snapshot["weights"], history, list(range(3, t + 1, 3)), sigma_rel, rtol=1e-12)


def test_a_snapshot_without_weights_is_refused_and_the_previous_file_kept(tmp_path):
    phema = PostHocEMA(sigma_rels=(0.10,), update_interval="3ba", snapshot_interval="4ba", folder=tmp_path)
    with pytest.raises(RuntimeError, match="no update yet"):
        phema.write_snapshots()
    run(phema, 8, WithBuffers())
    written = snapshots_in(tmp_path)[-1][2]  # the snapshot of step 6, written at step 8
    assert written.name == "phema-0000000006-0.1000.pt"
    good = written.read_bytes()
    state = phema.state_dict()
    del state["state_dict_keys"]  # as from before it was saved: nothing says which keys the weights are under
    resumed = PostHocEMA(sigma_rels=(0.10,), update_interval="3ba", snapshot_interval="4ba", folder=tmp_path)
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"sigma_rel=0.1.*no weights.*write_snapshots\(model\)"):
        resumed.write_snapshots()
    assert written.read_bytes() == good
    assert resumed.write_snapshots(WithBuffers()) == [written]  # given the model, it is laid out for it
    assert written.read_bytes() == good


def test_a_failed_snapshot_write_leaves_the_previous_file_and_no_leftover(tmp_path, monkeypatch):
    phema = PostHocEMA(sigma_rels=(0.10,), snapshot_interval="4ba", folder=tmp_path)
    run(phema, 4)
    (path,) = [path for _, _, path in snapshots_in(tmp_path)]
    good = path.read_bytes()

    def interrupted(obj, file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            file = open(file, "wb")  # noqa: SIM115 - left open, as a killed writer would
        file.write(b"half a snapshot")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(OSError, match="disk full"):
        phema.write_snapshots()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_cli_writes_edm2s_mix_of_the_snapshots(tmp_path, capsys):
    phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="100ba", folder=tmp_path / "phema")
    history: dict = {}
    model = run(phema, 1000, history=history)
    out = tmp_path / "ema.safetensors"
    assert main(["posthoc", str(tmp_path / "phema"), "--sigma-rel", "0.08", "--out", str(out)]) == 0
    weights = load_file(out)
    model.load_state_dict(weights)
    # the reference: every snapshot's closed form, mixed by EDM2's least squares (Eq. 151), in float64
    snapshots = [(t, s) for t in range(100, 1001, 100) for s in (0.05, 0.10)]
    averages = [power_ema(history, list(range(1, t + 1)), gamma_of(s)) for t, s in snapshots]
    x = snapshot_mix([t for t, _ in snapshots], [gamma_of(s) for _, s in snapshots], at=1000, gamma=gamma_of(0.08))
    torch.testing.assert_close(weights["weight"], mixed(averages, x)["weight"], rtol=1e-9, atol=1e-9)
    # which is within 1% of the power-function EMA of width 0.08 itself
    target = power_ema(history, list(range(1, 1001)), gamma_of(0.08))["weight"]
    assert (weights["weight"] - target).norm() / target.norm() < 0.01
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [out.name], "no leftovers"
    with pytest.raises(SystemExit, match="no snapshots"):
        main(["posthoc", str(tmp_path / "empty"), "--sigma-rel", "0.08", "--out", str(tmp_path / "x.safetensors")])


def test_a_failed_cli_write_leaves_the_previous_file_and_no_leftover(tmp_path, monkeypatch):
    import safetensors.torch

    run(PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="100ba", folder=tmp_path / "phema"), 200)
    out = tmp_path / "out" / "ema.safetensors"
    command = ["posthoc", str(tmp_path / "phema"), "--sigma-rel", "0.08", "--out", str(out)]
    assert main(command) == 0
    good = out.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(OSError, match="disk full"):
        main(command)
    assert out.read_bytes() == good
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_rels": ()}, "sigma_rels=\\(\\)"),
        ({"sigma_rels": (0.05, 0.05)}, "repeats"),
        ({"sigma_rels": (0.5,)}, "sigma_rel=0.5"),
        ({"snapshot_interval": "1ep"}, "snapshot_interval='1ep'"),
        ({"update_interval": "0ba"}, "update_interval='0ba'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PostHocEMA(folder=tmp_path, **kwargs)


@pytest.mark.parametrize("update_interval", ["1ba", "3ba"])
def test_in_a_trainer_snapshots_follow_the_clock_and_resume_continues_them(update_interval, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Callback, Classifier, Trainer

    data = TensorDataset(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)), torch.arange(48) % 3)

    class Recorder(Callback):
        """The model's state after every batch."""

        def __init__(self) -> None:
            self.history: dict[int, dict[str, torch.Tensor]] = {}

        def batch_end(self, state, logger) -> None:
            weights = state.model.state_dict()
            self.history[state.timestamp.batch] = {key: value.detach().clone() for key, value in weights.items()}

    def trainer(folder, duration, **kwargs) -> tuple[Trainer, PostHocEMA, Recorder]:
        torch.manual_seed(0)
        phema = PostHocEMA(
            sigma_rels=(0.05, 0.10), snapshot_interval="4ba", update_interval=update_interval, folder=folder
        )
        model = Classifier(nn.Linear(4, 3))
        loader = DataLoader(data, batch_size=8)
        recorder = Recorder()
        run = Trainer(
            model, loader, duration, algorithms=[phema], callbacks=[recorder], progress_bar=False, seed=0, **kwargs
        )
        return run, phema, recorder

    whole, whole_phema, recorder = trainer(tmp_path / "whole", "3ep")
    whole.fit()
    every = int(update_interval[:-2])
    times = [4, 8, 12, 16] if every == 1 else [3, 6, 12, 15]  # the last update's step at each snapshot
    found = snapshots_in(tmp_path / "whole")
    assert [(t, s) for t, s, _ in found] == [(t, s) for t in times for s in (0.05, 0.10)]
    first, _, _ = trainer(tmp_path / "resumed", "1ep", save_folder=tmp_path / "ckpt")
    first.fit()
    resumed, resumed_phema, _ = trainer(tmp_path / "resumed", "3ep", load_path=tmp_path / "ckpt" / "ep1-ba6.pt")
    resumed.fit()
    for a, b in zip(whole_phema.shadows, resumed_phema.shadows):
        for name, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], value), name
    assert [p.name for _, _, p in snapshots_in(tmp_path / "resumed")] == [p.name for _, _, p in found]
    for t, sigma_rel, path in found:
        again = tmp_path / "resumed" / path.name
        assert again.read_bytes() == path.read_bytes(), f"{path.name} differs after resuming"
        weights = torch.load(again, weights_only=True)["weights"]
        assert_is_the_power_ema(weights, recorder.history, list(range(every, t + 1, every)), sigma_rel, rtol=1e-5)


def test_a_posthoc_ema_runs_in_a_trainer_through_its_one_adapter(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Algorithm, Classifier, Event, Trainer
    from emakit.algorithms import PostHocEMAAlgorithm

    phema = PostHocEMA(sigma_rels=(0.05,), snapshot_interval="4ba", folder=tmp_path)
    assert not isinstance(phema, Algorithm)  # by hand it knows nothing of the trainer
    adapter = phema.as_algorithm()
    assert isinstance(adapter, PostHocEMAAlgorithm) and adapter.posthoc is phema and phema.as_algorithm() is adapter
    data = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3)
    trainer = Trainer(
        Classifier(nn.Linear(4, 3)), DataLoader(data, batch_size=4), "1ep", algorithms=[phema], progress_bar=False
    )
    assert trainer.engine.algorithms == [adapter]
    trainer.fit()
    assert phema.steps == 4 and [t for t, _, _ in snapshots_in(tmp_path)] == [4]
    saved = trainer.state_dict()["algorithms"][0]
    assert saved.keys() == phema.state_dict().keys() and saved["steps"] == 4  # the checkpoint holds its own state
    with pytest.warns(DeprecationWarning, match=r"PostHocEMA.match\(...\) is deprecated"):
        assert phema.match(Event.BATCH_END, trainer.state) is True
