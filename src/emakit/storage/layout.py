"""Where each tensor's average lives in a group's flat buffer, and the small tools every storage mode shares.

A group's average is one flat buffer; each tensor's average is its slice, starting on a 64-byte
boundary and presented as a tensor with its *own* storage object (:func:`own_storage`), so
serializers, ``deepcopy`` and pickling see each tensor's bytes, not the whole buffer.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "ALIGN_BYTES",
    "CHUNK_BYTES",
    "Views",
    "aligned_offsets",
    "chunk_ranges",
    "increment_versions",
    "is_dense",
    "normalize_device",
    "own_storage",
    "park",
    "storages",
    "versions",
]

ALIGN_BYTES = 64  # each tensor starts on a 64-byte boundary of its flat buffer
CHUNK_BYTES = 16 << 20  # the most bytes (besides one tensor) a swap check or a casting update holds as a temporary
CACHE_CHUNK_BYTES = 256 << 10  # on the CPU a swap check gathers small tensors in chunks that stay in cache
CHUNK_SHARE = 4  # and at most 1/4 of the group's bytes


def normalize_device(device: str | torch.device) -> torch.device:
    """``device`` as tensors report theirs: ``"cpu:0"`` is ``cpu``, ``"cuda"`` the current CUDA device (``cuda:0``).

    Comparing an unnormalised device with a tensor's makes equal places look different (an
    average on ``"cuda"`` of weights on ``cuda:0`` would take the casting path).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None:
        return torch.empty(0, device=device).device  # the backend's current device
    return device


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements of its storage, in any dim order."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class Views:
    """The shapes and strides of a list of tensors, to present slices of flat buffers like them, fast.

    ``views(flat, offsets)`` is one C-level ``map`` of ``as_strided`` (no Python loop per tensor); each
    view keeps its tensor's memory format where the tensor is dense (channels-last stays channels-last).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.shapes = [t.shape for t in tensors]
        self.strides = [t.stride() if is_dense(t) else torch.empty(t.shape, device="meta").stride() for t in tensors]
        self.numels = [t.numel() for t in tensors]

    def views(self, flat: torch.Tensor, offsets: Sequence[int], first: int = 0) -> list[torch.Tensor]:
        """Views of ``flat`` at ``offsets``, shaped like tensors ``first``, ``first + 1``, ..."""
        stop = first + len(offsets)
        return list(map(flat.as_strided, self.shapes[first:stop], self.strides[first:stop], offsets))


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view`` as a tensor with its own storage object: the view's bytes only, aliasing them.

    Serializers (``torch.save``, safetensors), ``deepcopy`` and pickling then see this tensor's
    bytes, not the whole flat buffer it is a slice of; the buffer stays alive while it lives.
    """
    return torch.from_dlpack(view.detach())


def aligned_offsets(tensors: Sequence[torch.Tensor], step: int) -> tuple[list[int], int]:
    """Offsets that start each tensor on a multiple of ``step`` elements, and the total length."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // step) * step
    return offsets, total


def chunk_ranges(offsets: Sequence[int], numels: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of consecutive tensors spanning at most ``limit`` elements (or one tensor)."""
    ranges, first = [], 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets) or offsets[i] + numels[i] - offsets[first] > limit:
            ranges.append((first, i))
            first = i
    return ranges


def chunk_limit(total: int, element_size: int) -> int:
    """The elements a chunk of a group of ``total`` elements may span: at most 16 MiB and 1/4 of the group."""
    return max(1, min(CHUNK_BYTES, max(1 << 20, total * element_size // CHUNK_SHARE)) // element_size)


def storages(tensors: Sequence[torch.Tensor]) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tensors]


try:  # torch >= 2.5 bumps a list of tensors in one call
    torch.autograd.graph.increment_version([])
    increment_versions: Callable[[Sequence[torch.Tensor]], None] = torch.autograd.graph.increment_version
except (TypeError, AttributeError, RuntimeError):

    def _increment_each(tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)

    increment_versions = _increment_each


_version = operator.attrgetter("_version")


def versions(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Autograd's version counters of ``tensors``: every in-place change through them (or their views) bumps one."""
    return list(map(_version, tensors))


def park(
    data: Sequence[torch.Tensor], views: Views, offsets: Sequence[int], chunks: Sequence[tuple[int, int]], end: int
) -> list[list[torch.Tensor]]:
    """A copy of ``data`` (laid out at ``offsets`` of a flat layout ``end`` elements long), per chunk in a buffer of its
    own: pieces of at most 16 MiB come back from the allocator's free lists swap after swap, where one buffer of the
    model's size is fresh memory each time (on the CPU its first touch costs more than the copy). Returns the copies,
    shaped like ``data``, chunk by chunk."""
    parked = []
    for i, j in chunks:
        start, stop = offsets[i], offsets[j] if j < len(offsets) else end
        piece = torch.empty(stop - start, dtype=data[i].dtype, device=data[i].device)
        copies = views.views(piece, [o - start for o in offsets[i:j]], i)
        torch._foreach_copy_(copies, list(data[i:j]))
        parked.append(copies)
    return parked
