"""``examples/accelerate_deepspeed.py``'s loop: an EMA by hand in Accelerate with a ``DeepSpeedPlugin`` (ZeRO-3) on
2 CPU processes, the real Accelerate and DeepSpeed (see ``accelerate_deepspeed_script.py`` for what it checks), and
what ``Accelerator(cpu=True, deepspeed_plugin=...)`` really runs (DDP). Skipped without DeepSpeed or Accelerate.
DeepSpeed runs on the CPU in the environment of the ``deepspeed_cpu`` fixture (``conftest.py``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from torchrun import torchrun

SCRIPT = Path(__file__).with_name("accelerate_deepspeed_script.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("accelerate") is None,
    reason="deepspeed or accelerate is not installed",
)


def test_ema_in_an_accelerate_deepspeed_zero3_loop_averages_evaluates_resumes_and_exports(tmp_path, deepspeed_cpu):
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))  # the emakit under test
    result = torchrun(SCRIPT, str(tmp_path), timeout=240, PYTHONPATH=path, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
