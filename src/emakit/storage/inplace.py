"""The default storage mode: an average of the tensors' own dtype and device, updated where the tensors are.

An update is one multi-tensor kernel over the model's tensors as they are (no copy, no Python
loop per tensor)::

    torch._foreach_lerp_(averages, model_tensors, 1 - smoothing)     # average += w * (model - average)

The model's tensors are never re-pointed: nothing another library holds (optimizer bucket views,
shared memory, numpy views, CUDA graph addresses) is invalidated.
"""

from __future__ import annotations

import torch

from emakit.storage.group import Group

__all__ = ["InPlaceGroup"]


class InPlaceGroup(Group):
    """Tensors averaged in their own dtype, on their own device: one ``_foreach_lerp_`` per update."""

    @torch.no_grad()
    def _lerp(self, weight: float) -> None:
        torch._foreach_lerp_(self.averages, self.sources, weight)
