"""Shared test setup."""

from __future__ import annotations

import os
import warnings

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
