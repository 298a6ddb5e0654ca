"""An EMA of an FSDP2-sharded model, in 2 processes on CPU (gloo), against the unsharded closed form."""

from pathlib import Path

import pytest
from torchrun import torchrun

from emakit import distributed

SCRIPT = Path(__file__).with_name("sharded_ema_script.py")


@pytest.mark.skipif(
    distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE,
    reason="torch's FSDP2 is wrong or absent on CPU before 2.9",
)
def test_fsdp2_ema_holds_local_shards_that_gather_to_the_unsharded_ema(tmp_path):
    result = torchrun(SCRIPT, str(tmp_path / "ema.safetensors"), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": ok, EMA bytes ratio") == 2
