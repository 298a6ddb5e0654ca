"""Shared test setup."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: tensors in tests are tiny, and on a busy machine every extra thread waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_environment(request):
    """Libraries run in-process (Lightning, DeepSpeed, accelerate) may set ``MASTER_ADDR``, ``RANK`` and friends; left
    set, they make a later Hugging Face Trainer or accelerate believe it is distributed. Restore the environment after
    every test and say which test changed the variables that decide it."""
    before = dict(os.environ)
    yield
    changed = sorted(name for name in DISTRIBUTED_VARIABLES if os.environ.get(name) != before.get(name))
    os.environ.clear()
    os.environ.update(before)
    if changed:
        names = ", ".join(changed)
        warnings.warn(f"{request.node.nodeid} changed {names} in the environment", RuntimeWarning, stacklevel=1)


@pytest.fixture(autouse=True)
def no_leaked_process_group(request):
    """A test that leaves torch's default process group initialized would break every later test that starts its own
    (``init_process_group`` twice): end it here and say which test left it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        warnings.warn(f"{request.node.nodeid} left the default process group initialized", RuntimeWarning, stacklevel=1)


BUILD_DEEPSPEED_CPU_OP = "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"


@pytest.fixture(scope="session")
def deepspeed_cpu() -> dict[str, str]:
    """The environment of a DeepSpeed run on the CPU (``DS_ACCELERATOR=cpu``, ``TORCH_EXTENSIONS_DIR``), with
    DeepSpeed's CPU communication op already built there, once, in one process with all the time it needs.

    Every DeepSpeed process loads that op, and the first one compiles it (~30 s, minutes on a loaded machine) under
    torch's build lock: a file that only its holder removes. A torchrun test killed at its timeout mid-compile left
    the lock behind, and every later DeepSpeed test waited on it until its own timeout. Here the build runs under a
    lock the kernel releases when its holder dies, and a build lock older than any build is removed first.
    """
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/emakit-torch-extensions"))
    environment = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(directory)}
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "emakit-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for left_behind in directory.glob("*/lock"):
            if time.time() - left_behind.stat().st_mtime > 600:
                left_behind.unlink()
        build = subprocess.run(
            [sys.executable, "-c", BUILD_DEEPSPEED_CPU_OP],
            env={**os.environ, **environment}, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
    assert build.returncode == 0, f"DeepSpeed's CPU op did not build:\n{build.stdout[-3000:]}{build.stderr[-5000:]}"
    return environment
