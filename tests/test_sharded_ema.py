"""An EMA of an FSDP2-sharded model, in 2 processes on CPU (gloo), against the unsharded closed form."""

from pathlib import Path

from torchrun import torchrun

SCRIPT = Path(__file__).with_name("sharded_ema_script.py")


def test_fsdp2_ema_holds_local_shards_that_gather_to_the_unsharded_ema(tmp_path):
    result = torchrun(SCRIPT, str(tmp_path / "ema.safetensors"), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": ok, EMA bytes ratio") == 2
