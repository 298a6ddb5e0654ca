"""An EMA of a raw DeepSpeed engine (ZeRO stage 1, 2, 3; fp32 and bf16) by hand, in 2 processes on CPU (gloo),
against the float64 closed form of the weights it follows: see ``deepspeed_ema_script.py`` for what each run checks.

Skipped where DeepSpeed is not installed. The first run compiles DeepSpeed's CPU communication op (~30 s), cached
in ``TORCH_EXTENSIONS_DIR`` (default here: ``/tmp/emakit-torch-extensions``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from torchrun import torchrun

SCRIPT = Path(__file__).with_name("deepspeed_ema_script.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize(
    ("stage", "dtype", "persistence"),
    [(1, "fp32", 0), (2, "bf16", 0), (3, "fp32", 0), (3, "bf16", 100)],
    ids=["zero1-fp32", "zero2-bf16", "zero3-fp32", "zero3-bf16-persistent-biases"],
)
def test_ema_of_a_deepspeed_engine_follows_the_closed_form_without_communication(tmp_path, stage, dtype, persistence):
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/emakit-torch-extensions")
    result = torchrun(
        SCRIPT, str(stage), dtype, str(persistence), str(tmp_path),
        timeout=150, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    if stage == 3:
        assert result.stdout.count("ZeRO-3 average holds 0.") == 2
