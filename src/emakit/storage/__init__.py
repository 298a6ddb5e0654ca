"""The average's memory: one group per (kind, device, dtype) of a model's tensors, in one of three storage modes.

See :mod:`emakit.storage.group` for the modes and what every group does, :mod:`emakit.storage.write_check`
for how a write into the model during a swap is found, :mod:`emakit.storage.sharded` for how a group reaches
this process's data of a sharded tensor (FSDP2's DTensor shards, DeepSpeed ZeRO-3's partitions:
:mod:`emakit.storage.zero`), and :mod:`emakit.storage.unsupported` for the tensors refused.
"""

from emakit.storage.bound import BoundGroup
from emakit.storage.cast import CastGroup
from emakit.storage.group import Group
from emakit.storage.inplace import InPlaceGroup

__all__ = ["BoundGroup", "CastGroup", "Group", "InPlaceGroup"]
