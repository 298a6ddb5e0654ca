"""An EMA of an FSDP2-sharded model, in 2 processes on CPU (gloo), against the unsharded closed form."""

import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sharded_ema_script.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fsdp2_ema_holds_local_shards_that_gather_to_the_unsharded_ema(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master-port",
        str(free_port()),
        str(SCRIPT),
        str(tmp_path / "ema.safetensors"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": ok, EMA bytes ratio") == 2
