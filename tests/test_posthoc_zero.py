"""PostHocEMA of a DeepSpeed ZeRO-3 engine, 2 processes on CPU (gloo): each rank averages its partitions of the fp32
master weights with no communication per update; snapshots gather them to rank 0 and hold EDM2's power-function
EMA of the full weights (``posthoc_reference.py``, written without emakit), and a resumed run writes the same ones.

The run is ``posthoc_zero_script.py``. Skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from posthoc_reference import gamma_of, power_ema
from torchrun import torchrun

from emakit.posthoc import snapshots_in

SCRIPT = Path(__file__).with_name("posthoc_zero_script.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def test_zero3_snapshots_hold_the_power_function_ema_of_the_master_weights(tmp_path, deepspeed_cpu):
    result = torchrun(SCRIPT, "bf16", str(tmp_path), timeout=180, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    records = torch.load(tmp_path / "records.pt", weights_only=True)
    found = snapshots_in(tmp_path / "snapshots")
    assert [(t, s) for t, s, _ in found] == [(t, s) for t in (4, 8, 12) for s in (0.05, 0.10)]
    for t, sigma_rel, path in found:
        snapshot = torch.load(path, weights_only=True)
        assert list(snapshot["weights"]) == records["keys"], "keyed like the plain model's state_dict"
        expected = power_ema(records["history"], list(range(2, t + 1, 2)), gamma_of(sigma_rel))
        for key, value in expected.items():
            weights = snapshot["weights"][key]
            assert weights.shape == value.shape, f"{key}: {tuple(weights.shape)}, not the full shape"
            # float32 averages of the fp32 masters (under bf16 training): float32 rounding, not bf16's
            torch.testing.assert_close(weights.double(), value, rtol=1e-5, atol=1e-6, msg=f"{path.name}: {key}")
