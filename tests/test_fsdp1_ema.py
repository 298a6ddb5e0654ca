"""An EMA of a torch FSDP1 model (``FullyShardedDataParallel``, ``use_orig_params`` True and False) by hand, in 2
processes on CPU (gloo, ``device_id=cpu``), against the float64 closed form of the full weights: see
``fsdp1_ema_script.py`` for what each run checks.

``examples/fsdp1.py`` (the runnable example of ``docs/integrations/fsdp1.md``) is run and resumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun import torchrun

from emakit import distributed

SCRIPT = Path(__file__).with_name("fsdp1_ema_script.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp1.py"

pytestmark = pytest.mark.skipif(
    distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE, reason="FSDP on CPU (gloo) needs torch >= 2.9"
)


@pytest.mark.parametrize("orig", ["false", "true"], ids=["flat-params", "use-orig-params"])
def test_ema_of_an_fsdp1_model_follows_the_closed_form_without_communication(tmp_path, orig):
    result = torchrun(SCRIPT, orig, str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    assert result.stdout.count("of the parameters' unsharded bytes") == 2
    for mode in ("SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD 2x1", "HYBRID_SHARD 1x2", "mixed precision"):
        assert result.stdout.count(f": {mode}: {{'engine': 'fsdp1'") == 2, (mode, result.stdout[-3000:])
