"""Moved to :mod:`emakit.ema`; ``from emakit.algorithms.ema import EMA`` still works."""

from emakit.ema import EMA

__all__ = ["EMA"]
