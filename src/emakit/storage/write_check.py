"""Finding writes into a model's parameters while an average is swapped in: an exact comparison.

A swap copies each average into the model's tensors (cast to their dtype, moved to their device)
and parks the training weights aside; the average itself is never written during the swap. When
the swap ends, every parameter is compared, bit for bit, with a fresh copy of its average made
the same way: any in-place change inside the block (an optimizer step, ``.data``, numpy, a sign
flip, a permutation, a single bit) makes the two differ, since no arithmetic can fool an equality
of bytes. The comparison goes a chunk of tensors at a time through two small scratch buffers in
which the chunk's tensors lie densely (no padding to compare) — chunks that stay in cache on the
CPU: one ``torch.equal`` per chunk, and a loop per tensor only to name the tensors of a chunk that
differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emakit.storage.layout import CACHE_CHUNK_BYTES, CHUNK_BYTES, Views, chunk_ranges

__all__ = ["WriteCheck"]

ALONE_BYTES = 64 << 10  # a tensor this large is compared where it is; smaller ones are gathered a chunk at a time


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class WriteCheck:
    """The comparison plan for one group's tensors: chunks, and each tensor's place in a dense scratch buffer.

    A tensor that fills a chunk alone is compared where it is (two reads, no copy; an average of another
    dtype or device is first copied as the swap copied it in); smaller ones are gathered densely, a
    chunk at a time, into two scratch buffers that stay in cache on the CPU.

    Example::

        >>> weights, average = [torch.zeros(3)], [torch.ones(3)]
        >>> torch._foreach_copy_(weights, average)
        >>> weights[0][1] = -1.0
        >>> WriteCheck(weights).written(weights, average)
        [0]
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.views = Views(tensors)
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        dense, total = [], 0
        for numel in self.views.numels:
            dense.append(total)
            total += numel
        size = tensors[0].element_size()
        limit = (CACHE_CHUNK_BYTES if self.device.type == "cpu" else CHUNK_BYTES) // size
        ranges = []
        for i, j in chunk_ranges(dense, self.views.numels, max(1, limit)):
            first = i  # tensors of at least ALONE_BYTES are compared where they are, each in a chunk of its own
            for k in range(i, j):
                if self.views.numels[k] * size >= ALONE_BYTES:
                    ranges += [(first, k)] * (k > first) + [(k, k + 1)]
                    first = k + 1
            ranges += [(first, j)] * (j > first)
        self.chunks = [(i, j, [o - dense[i] for o in dense[i:j]], sum(self.views.numels[i:j])) for i, j in ranges]

    def written(self, model_tensors: list[torch.Tensor], averages: list[torch.Tensor]) -> list[int]:
        """Indices of the model tensors that no longer hold exactly what ``_foreach_copy_(model, averages)`` put in."""
        written = [i for i, j, _, _ in self.chunks if j == i + 1 and not _holds(model_tensors[i], averages[i])]
        gathered = [chunk for chunk in self.chunks if chunk[1] > chunk[0] + 1]
        if not gathered:
            return written
        words = max(1, 8 // _element_size(self.dtype))  # elements per 8-byte word: compared as int64, the fastest
        widest = max(total for *_, total in gathered) + words
        held = torch.empty(widest, dtype=self.dtype, device=self.device)  # what the model holds now
        expected = torch.empty_like(held)  # what the swap put there
        for i, j, offsets, total in gathered:
            held_views, expected_views = self.views.views(held, offsets, i), self.views.views(expected, offsets, i)
            torch._foreach_copy_(held_views, model_tensors[i:j])
            torch._foreach_copy_(expected_views, averages[i:j])
            whole = -(-total // words) * words
            if whole > total:  # the last word's tail: the same zeros on both sides
                held[total:whole].zero_()
                expected[total:whole].zero_()
            if torch.equal(_bits(held[:whole]), _bits(expected[:whole])):
                continue
            for k, (now, then) in enumerate(zip(held_views, expected_views), start=i):
                if not torch.equal(_bits(now), _bits(then)):
                    written.append(k)
        return sorted(written)


def _holds(tensor: torch.Tensor, average: torch.Tensor) -> bool:
    """Whether ``tensor`` holds exactly what copying ``average`` into it gives."""
    if (average.dtype, average.device) != (tensor.dtype, tensor.device):
        copied = torch.empty_like(tensor)
        torch._foreach_copy_([copied], [average])
        average = copied
    return torch.equal(_bits(tensor), _bits(average))


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as integers, equal exactly when the bytes are: int64 words where the tensor is
    contiguous and lies on whole, aligned words (``torch.equal`` of int64 runs at copy speed), else
    integers of its element size (any strides)."""
    size = tensor.element_size()
    if tensor.is_contiguous() and (tensor.numel() * size) % 8 == 0 and (tensor.storage_offset() * size) % 8 == 0:
        return tensor.reshape(-1).view(torch.uint8).view(torch.int64)
    if size in _INTEGER_OF_SIZE:
        return tensor.view(_INTEGER_OF_SIZE[size])
    return tensor.reshape(-1).view(torch.uint8)  # complex128: 16 bytes an element
