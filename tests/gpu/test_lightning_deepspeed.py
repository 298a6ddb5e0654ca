"""EMACallback under Lightning's DeepSpeedStrategy (ZeRO-2 and ZeRO-3) on 2 CUDA devices: see
``lightning_deepspeed_script.py`` for the checks. Lightning 2.6 refuses DeepSpeed on the CPU (pinned by
``tests/test_lightning_sharded.py``), so these run on GPUs only; skipped without CUDA (this folder's conftest), with
fewer than 2 devices, or without DeepSpeed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torchrun import torchrun

SCRIPT = Path(__file__).with_name("lightning_deepspeed_script.py")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one process each)"),
]


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_ema_callback_under_lightning_deepspeed(tmp_path, stage):
    result = torchrun(SCRIPT, str(tmp_path), str(stage), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(f"zero{stage} rank") >= 2 and result.stdout.count(": ok") == 2, result.stdout[-3000:]
