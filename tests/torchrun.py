"""Launch a test script on 2 CPU processes with torchrun (gloo), on a free local port, with a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker``: torchrun starts its workers in sessions of their
    own, so a worker stuck after torchrun exited is found by the mark this launch gave it."""
    needle = f"EMAKIT_TORCHRUN_ID={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


def torchrun(script: Path, *args: str, timeout: float = 90, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node NPROC script *args`` (2 by default), output captured.

    On timeout every process of the launch is killed (none is left running) and TimeoutExpired raised.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    marker = uuid.uuid4().hex
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "EMAKIT_TORCHRUN_ID": marker, **env}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not this process's, if any
        environment.pop(name, None)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_marked(marker)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
