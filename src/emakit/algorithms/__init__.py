"""Algorithms for the trainer: each decides when to act on the training state."""

from emakit.algorithms.ema import EMA
from emakit.algorithms.posthoc import PostHocEMA

__all__ = ["EMA", "PostHocEMA"]
