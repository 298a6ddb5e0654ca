"""The Hugging Face Trainer's ``fsdp=`` with ``fsdp_version=2`` on 2 CUDA devices (nccl), where it really shards:
``EMATrainer``'s average of the DTensor shards against the float64 closed form of the full weights, evaluation with
the average, and ``save_ema_model`` loaded with ``from_pretrained``. Skipped without 2 CUDA devices (on CPU the
Trainer runs DDP instead: ``tests/test_hf_fsdp.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchrun import torchrun

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "hf_fsdp_script.py"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ema_trainer_under_fsdp2_averages_the_shards_and_exports_the_whole_average(tmp_path):
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))  # the emakit under test
    result = torchrun(SCRIPT, "2", str(tmp_path), timeout=300, PYTHONPATH=path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    reference = torch.load(tmp_path / "result.pt", weights_only=True)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ema").state_dict()
    for name, value in reference["expected"].items():
        torch.testing.assert_close(loaded[name].double(), value, rtol=1e-5, atol=2e-6, msg=name)
