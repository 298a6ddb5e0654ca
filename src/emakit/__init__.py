"""emakit: exponential moving averages of model weights for PyTorch training."""

from emakit import distributed, functional
from emakit._version import __version__ as __version__
from emakit.algorithms import EMA, PostHocEMA
from emakit.batchnorm import update_bn
from emakit.core import Algorithm, Callback, Event, State
from emakit.models import Classifier
from emakit.time import Time, Timestamp, TimeUnit
from emakit.trainer import Trainer

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
    "update_bn",
]
