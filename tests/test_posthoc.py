"""Post-hoc EMA against EDM2's closed forms: the profile, its width, the snapshot mix, and a reconstruction."""

from __future__ import annotations

import math

import pytest
import torch
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


def run(phema: PostHocEMA, steps: int, model: nn.Module | None = None) -> nn.Module:
    model = model or Trajectory()
    for step in range(1, steps + 1):
        model.at(step)
        phema.update(model)
    return model


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56), (0.20, 1.83)])
def test_gamma_from_sigma_rel_is_edm2s_root(sigma_rel, gamma):
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=0.005)
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
    gamma = gamma_from_sigma_rel(0.10)
    average = phema.shadows[0].state_dict()["weight"].item()
    assert average / steps == pytest.approx((gamma + 1) / (gamma + 2), rel=2e-3)


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
    run(phema, 4000)
    direct = phema.shadows[1].state_dict()["weight"]
    synthesized = synthesize(tmp_path, 0.10, sources=(0.05, 0.15))["weight"]
    error = (synthesized - direct).norm() / direct.norm()
    assert error < 0.01, float(error)
    middle = synthesize(tmp_path, 0.10, at=2000, sources=(0.05, 0.15))["weight"]  # only snapshots up to step 2000
    check = PostHocEMA(sigma_rels=(0.10,), snapshot_interval="100000ba", folder=tmp_path / "check")
    run(check, 2000)
    assert ((middle - check.shadows[0].state_dict()["weight"]).norm() / middle.norm()) < 0.01


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


def test_the_cli_writes_a_file_that_loads_into_the_model(tmp_path, capsys):
    phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="100ba", folder=tmp_path)
    model = run(phema, 1000)
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.08", "--out", str(tmp_path / "ema.safetensors")]) == 0
    weights = load_file(tmp_path / "ema.safetensors")
    model.load_state_dict(weights)
    torch.testing.assert_close(weights["weight"], synthesize(tmp_path, 0.08)["weight"])
    with pytest.raises(SystemExit, match="no snapshots"):
        main(["posthoc", str(tmp_path / "empty"), "--sigma-rel", "0.08", "--out", str(tmp_path / "x.safetensors")])


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


def test_in_a_trainer_snapshots_follow_the_clock_and_resume_continues_them(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from emakit import Classifier, Trainer

    data = TensorDataset(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)), torch.arange(48) % 3)

    def trainer(folder, duration, **kwargs) -> tuple[Trainer, PostHocEMA]:
        torch.manual_seed(0)
        phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="4ba", folder=folder)
        model = Classifier(nn.Linear(4, 3))
        loader = DataLoader(data, batch_size=8)
        return Trainer(model, loader, duration, algorithms=[phema], progress_bar=False, seed=0, **kwargs), phema

    whole, whole_phema = trainer(tmp_path / "whole", "3ep")
    whole.fit()
    assert [t for t, s, _ in snapshots_in(tmp_path / "whole") if s == 0.05] == [4, 8, 12, 16]
    first, _ = trainer(tmp_path / "resumed", "1ep", save_folder=tmp_path / "ckpt")
    first.fit()
    resumed, resumed_phema = trainer(tmp_path / "resumed", "3ep", load_path=tmp_path / "ckpt" / "ep1-ba6.pt")
    resumed.fit()
    for a, b in zip(whole_phema.shadows, resumed_phema.shadows):
        for name, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], value), name
    for t in (8, 12, 16):
        name = f"phema-{t:010d}-0.1000.pt"
        snapshot, again = (torch.load(tmp_path / run / name, weights_only=True) for run in ("whole", "resumed"))
        assert all(torch.equal(snapshot["weights"][k], v) for k, v in again["weights"].items())
