"""This process's data of a tracked tensor, in whichever engine sharded it: the one place that knows where a shard is.

The rule: **the average lives where the weights' shards live**. Each rank averages the data it holds of each
tensor, with no communication per update; a swap writes that data (the engine gathers it for the forward pass);
only exports gather, to rank 0, one tensor at a time. What "the data it holds" means depends on the engine:

==================  ======================================  ==========================================
tensor              :func:`local` (what a swap writes)        what gathering it takes
==================  ======================================  ==========================================
plain tensor        the tensor itself                       nothing
FSDP2 ``DTensor``   its local shard (``_local_tensor``)     ``full_tensor()`` (collective)
==================  ======================================  ==========================================

Nothing here imports an engine: a DTensor exists only once ``torch.distributed.tensor`` is imported, so until
then nothing is one. Tensors no engine here understands are refused by :mod:`emakit.storage.unsupported`.

Example::

    >>> w = torch.ones(3)
    >>> local(w) is w, is_sharded(w)
    (True, False)
"""

from __future__ import annotations

import sys

import torch

__all__ = ["is_dtensor", "is_sharded", "local"]


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 shard), without importing DTensor support.

    ``torch.distributed.tensor`` costs about half a second to import (it pulls in sympy); a DTensor
    exists only once it is imported, so until then nothing is one.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether this process holds only part of ``tensor`` (or holds it somewhere other than ``tensor`` itself)."""
    return is_dtensor(tensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's data of ``tensor``: the local shard of a DTensor (FSDP2), else the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor
