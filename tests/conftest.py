"""Shared test setup."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: tensors in tests are tiny, and on a busy machine every extra thread waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_leaked_process_group(request):
    """A test that leaves torch's default process group initialized would break every later test that starts its own
    (``init_process_group`` twice): end it here and say which test left it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        import warnings

        warnings.warn(f"{request.node.nodeid} left the default process group initialized", RuntimeWarning, stacklevel=1)
