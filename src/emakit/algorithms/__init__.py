"""Algorithms for the trainer: each decides when to act on the training state."""

from emakit.algorithms.ema import EMA

__all__ = ["EMA"]
