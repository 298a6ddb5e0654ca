"""PostHocEMA of an FSDP2- or FSDP1-sharded model, 2 processes on CPU (gloo): full snapshots, against the float64
closed form.

The runs are tests/posthoc_fsdp_script.py; the expected averages come from tests/posthoc_reference.py (EDM2's
formulas written out without emakit).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from posthoc_reference import gamma_of, mixed, power_ema, snapshot_mix
from torchrun import torchrun

from emakit import distributed
from emakit.algorithms.posthoc import snapshots_in, synthesize

SCRIPT = Path(__file__).with_name("posthoc_fsdp_script.py")

pytestmark = pytest.mark.skipif(
    distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE,
    reason="torch's FSDP2 is wrong or absent on CPU before 2.9",
)


def _launch(mode: str, out: Path) -> None:
    result = torchrun(SCRIPT, mode, str(out), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _keys(weights: dict, ordered: bool) -> list[str]:
    return list(weights) if ordered else sorted(weights)


def _assert_is_the_power_ema(
    weights: dict, history: dict, times: list[int], sigma_rel: float, rtol: float, ordered: bool = True
) -> None:
    expected = power_ema(history, times, gamma_of(sigma_rel))
    assert _keys(weights, ordered) == _keys(expected, ordered), "a snapshot holds the model's state_dict keys"
    for key, value in expected.items():
        assert type(weights[key]) is torch.Tensor, f"{key}: a {type(weights[key]).__name__}, not a plain tensor"
        assert weights[key].shape == value.shape, f"{key}: {tuple(weights[key].shape)}, not the full shape"
        if value.is_floating_point():
            torch.testing.assert_close(weights[key].double(), value, rtol=rtol, atol=rtol, msg=key)
        else:
            assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("mode", ["snapshots", "snapshots-fsdp1-flat", "snapshots-fsdp1-orig"])
def test_fsdp_snapshots_hold_the_full_power_function_ema_and_synthesize(tmp_path, mode):
    """FSDP2 (DTensor shards), and torch's FSDP1 with ``use_orig_params`` False (the averages of FlatParameter
    shards stand for several tensors) and True."""
    _launch(mode, tmp_path)
    ordered = mode == "snapshots"  # under FSDP1 a snapshot lists the parameters first, then the buffers
    records = _load(tmp_path / "records.pt")
    assert records["sharded"], "the averages must be held in shards for this test to mean anything"
    history = records["history"]
    folder = tmp_path / "snapshots"
    found = snapshots_in(folder)
    assert [(t, s) for t, s, _ in found] == [(t, s) for t in (4, 8, 12) for s in (0.05, 0.10)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for _, _, p in found), "no leftovers"
    expected = []
    for t, sigma_rel, path in found:
        snapshot = _load(path)
        assert (snapshot["t"], snapshot["sigma_rel"]) == (t, sigma_rel)
        assert _keys(snapshot["weights"], ordered) == _keys(records["keys"], ordered)
        times = list(range(2, t + 1, 2))
        _assert_is_the_power_ema(snapshot["weights"], history, times, sigma_rel, rtol=1e-12, ordered=ordered)
        expected.append(power_ema(history, list(range(2, t + 1, 2)), gamma_of(sigma_rel)))
    # the synthesized EMA is EDM2's least-squares mix of those snapshots
    x = snapshot_mix([t for t, _, _ in found], [gamma_of(s) for _, s, _ in found], at=12, gamma=gamma_of(0.08))
    reference = mixed(expected, x)
    weights = synthesize(folder, sigma_rel=0.08)
    assert _keys(weights, ordered) == _keys(records["keys"], ordered)
    for key, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[key], value, rtol=1e-9, atol=1e-9, msg=key)
        else:
            assert torch.equal(weights[key], value), key


def test_fsdp2_trainer_resumed_from_a_sharded_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    _launch("trainer", tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    names = [p.name for _, _, p in snapshots_in(whole)]
    # update every 3 batches, snapshot every 4: each snapshot is named by its last update's step
    assert [(t, s) for t, s, _ in snapshots_in(whole)] == [(t, s) for t in (3, 6, 12, 15) for s in (0.05, 0.10)]
    assert [p.name for _, _, p in snapshots_in(resumed)] == names
    history = _load(tmp_path / "trainer-whole-rank0.pt")["history"]
    for name in names:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), f"{name} differs after resuming"
        snapshot = _load(whole / name)
        times = list(range(3, snapshot["t"] + 1, 3))
        _assert_is_the_power_ema(snapshot["weights"], history, times, snapshot["sigma_rel"], rtol=1e-5)
    for rank in (0, 1):
        a, b = (_load(tmp_path / f"trainer-{run}-rank{rank}.pt") for run in ("whole", "resumed"))
        assert a["steps"] == b["steps"] == 18
        for average, again in zip(a["averages"], b["averages"]):
            assert average.keys() == again.keys()
            for key, value in average.items():
                assert torch.equal(again[key], value), f"rank {rank}: the resumed average differs at {key}"
