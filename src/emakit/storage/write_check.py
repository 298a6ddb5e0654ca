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


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _words(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s bytes as int64 words where they fill whole words (``torch.equal`` of int64 runs at copy speed;
    of bytes, several times slower), else as bytes."""
    raw = flat.view(torch.uint8)
    return raw.view(torch.int64) if raw.numel() % 8 == 0 else raw


class WriteCheck:
    """The comparison plan for one group's tensors: chunks, and each tensor's place in a dense scratch buffer.

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
        limit = (CACHE_CHUNK_BYTES if self.device.type == "cpu" else CHUNK_BYTES) // tensors[0].element_size()
        self.chunks = [
            (i, j, [o - dense[i] for o in dense[i:j]], sum(self.views.numels[i:j]))
            for i, j in chunk_ranges(dense, self.views.numels, max(1, limit))
        ]

    def written(self, model_tensors: Sequence[torch.Tensor], averages: Sequence[torch.Tensor]) -> list[int]:
        """Indices of the model tensors that no longer hold exactly what ``_foreach_copy_(model, averages)`` put in."""
        words = max(1, 8 // _element_size(self.dtype))  # elements per 8-byte word: compared as int64, the fastest
        widest = max(total for *_, total in self.chunks) + words
        held = torch.empty(widest, dtype=self.dtype, device=self.device)  # what the model holds now
        expected = torch.empty_like(held)  # what the swap put there
        written = []
        for i, j, offsets, total in self.chunks:
            held_views, expected_views = self.views.views(held, offsets, i), self.views.views(expected, offsets, i)
            torch._foreach_copy_(held_views, model_tensors[i:j])
            torch._foreach_copy_(expected_views, averages[i:j])
            whole = -(-total // words) * words
            if whole > total:  # the last word's tail: the same zeros on both sides
                held[total:whole].zero_()
                expected[total:whole].zero_()
            if torch.equal(_words(held[:whole]), _words(expected[:whole])):
                continue
            for k, (now, then) in enumerate(zip(held_views, expected_views), start=i):
                if not torch.equal(now.reshape(-1).view(torch.uint8), then.reshape(-1).view(torch.uint8)):
                    written.append(k)
        return written
