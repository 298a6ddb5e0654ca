"""emakit: exponential moving averages of model weights for PyTorch training."""

from typing import TYPE_CHECKING

from emakit import functional
from emakit._version import __version__ as __version__
from emakit.batchnorm import update_bn
from emakit.core import Algorithm, Callback, Event, State
from emakit.ema import EMA
from emakit.models import Classifier
from emakit.posthoc import PostHocEMA
from emakit.time import Time, Timestamp, TimeUnit

if TYPE_CHECKING:  # imported on first use (__getattr__ below); type checkers see them as they are
    from emakit import distributed as distributed
    from emakit.merging import merge as merge
    from emakit.trainer import Trainer as Trainer

__all__ = [
    "EMA",
    "Algorithm",
    "Callback",
    "Classifier",
    "Event",
    "PostHocEMA",
    "State",
    "Time",
    "TimeUnit",
    "Timestamp",
    "Trainer",
    "distributed",
    "functional",
    "merge",
    "update_bn",
]


def __getattr__(name: str) -> object:
    """``Trainer``, ``distributed`` and ``merge``, imported on first use: the trainer (tqdm, data loading), the
    multi-process helpers and checkpoint merging are not needed to average weights by hand, and ``import emakit``
    stays cheap."""
    if name == "Trainer":
        from emakit.trainer import Trainer

        return Trainer
    if name == "distributed":
        import emakit.distributed

        return emakit.distributed
    if name == "merge":
        from emakit.merging import merge

        return merge
    raise AttributeError(f"module 'emakit' has no attribute {name!r}")
