"""Count the collectives a block of a multi-process test calls: the check that an EMA update communicates nothing.

A test asserts both sides: no call inside ``ema.update``, and at least one around something that must communicate
(an export's gather), so that a counter which saw nothing cannot pass for an update that sent nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_coalesced", "all_gather_single",
    "reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_fn", "broadcast", "gather", "scatter", "reduce",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_to_all_single", "all_to_all",
    "all_gather_object", "broadcast_object_list", "gather_object", "_all_gather_base", "_reduce_scatter_base",
    "all_reduce_coalesced", "inference_all_reduce", "allgather_fn",
)  # fmt: skip


@contextlib.contextmanager
def counting_collectives(*others: ModuleType) -> Iterator[list[str]]:
    """Every call, in order, of a collective of ``torch.distributed`` (named bare: ``"all_gather"``) and of each module
    in ``others`` (named with the module: ``"deepspeed.comm.all_gather"``) inside the block."""
    calls: list[str] = []

    def counted(name: str, function, *args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    patched = []
    for module in (dist, *others):
        for name in COLLECTIVES:
            function = getattr(module, name, None)
            if callable(function):
                patched.append((module, name, function))
                label = name if module is dist else f"{module.__name__}.{name}"
                setattr(module, name, functools.partial(counted, label, function))
    try:
        yield calls
    finally:
        for module, name, function in patched:
            setattr(module, name, function)
