"""An EMA of a raw DeepSpeed engine (ZeRO stage 1, 2, 3; fp32 and bf16) by hand, in 2 processes on CPU (gloo),
against the float64 closed form of the weights it follows: see ``deepspeed_ema_script.py`` for what each run checks.

``examples/deepspeed_zero.py`` (the runnable example of ``docs/integrations/deepspeed.md``) is run and resumed.
Skipped where DeepSpeed is not installed; it runs on the CPU in the environment of the ``deepspeed_cpu`` fixture
(``conftest.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torchrun import torchrun

SCRIPT = Path(__file__).with_name("deepspeed_ema_script.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deepspeed_zero.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize(
    ("stage", "dtype", "persistence"),
    [(1, "fp32", 0), (2, "bf16", 0), (3, "fp32", 0), (3, "bf16", 100)],
    ids=["zero1-fp32", "zero2-bf16", "zero3-fp32", "zero3-bf16-persistent-biases"],
)
def test_ema_of_a_deepspeed_engine_follows_the_closed_form_without_communication(
    tmp_path, deepspeed_cpu, stage, dtype, persistence
):
    result = torchrun(SCRIPT, str(stage), dtype, str(persistence), str(tmp_path), timeout=150, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    if stage == 3:
        assert result.stdout.count("ZeRO-3 average holds 0.") == 2


def test_the_documented_example_resumes_its_ema_bit_for_bit(tmp_path, deepspeed_cpu):
    """``examples/deepspeed_zero.py`` (ZeRO-3, 2 micro-batches per optimizer step): 20 steps at once, and 10 then
    resumed from its checkpoint to 20, end with the same EMA partitions on every rank (20 updates: one per optimizer
    step, not per micro-batch) and the same exported file, bit for bit."""
    runs = {"whole": ["--steps", "20"], "first": ["--steps", "10"], "resumed": ["--steps", "20", "--resume"]}
    runs = {run: ["--accumulate", "2", *args] for run, args in runs.items()}
    outputs = {}
    for run, args in runs.items():
        out = tmp_path / ("whole" if run == "whole" else "split")
        result = torchrun(EXAMPLE, *args, "--out", str(out), timeout=100, **deepspeed_cpu)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        outputs[run] = result.stdout
    # the swapped-in evaluation and the plain model holding the exported average agree
    assert "step 20: eval loss" in outputs["whole"]
    swapped = outputs["whole"].split("step 20: eval loss")[1].split(" EMA")[0].split(", ")[1]
    assert f"plain model with the EMA weights: eval loss {swapped}" in outputs["whole"]
    for rank in (0, 1):
        whole, split = (
            torch.load(tmp_path / run / "checkpoint" / f"ema-rank{rank}.pt", weights_only=True)
            for run in ("whole", "split")
        )
        assert whole["partitioning"] == {"engine": "deepspeed-zero3", "rank": rank, "world_size": 2}
        assert whole["num_updates"] == split["num_updates"] == 20
        for name, value in whole["weights"].items():
            assert torch.equal(split["weights"][name], value), name
    exported = [safetensors.torch.load_file(tmp_path / run / "ema.safetensors") for run in ("whole", "split")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][name], exported[1][name]) for name in exported[0])
