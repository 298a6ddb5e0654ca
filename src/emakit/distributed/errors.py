"""Failed collectives: :class:`CollectiveError`, and :func:`explain_failures`, which says what probably happened."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from emakit.distributed.environment import rank, timeout_seconds, world_size

__all__ = ["CollectiveError", "explain_failures"]


class CollectiveError(RuntimeError):
    """Waiting for the other ranks failed: one of them crashed, hangs, or is unreachable."""


_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL")


@contextlib.contextmanager
def explain_failures() -> Iterator[None]:
    """Re-raise a failed or timed-out collective as a :class:`CollectiveError` that says what probably happened."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        failed = isinstance(error, dist.DistError) or any(s in str(error) for s in _COLLECTIVE_FAILURES)
        if world_size() <= 1 or not failed:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: waiting for the other ranks failed ({first}). Another rank "
            f"probably crashed or hangs: see its output. Collectives time out after {timeout_seconds():g} s "
            "(set EMAKIT_DIST_TIMEOUT to change it)"
        ) from error
