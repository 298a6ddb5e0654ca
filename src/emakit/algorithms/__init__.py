"""The trainer's adapters: averages used by hand (:mod:`emakit.ema`, :mod:`emakit.posthoc`) run by emakit's Trainer.

``Trainer(algorithms=[ema])`` runs ``ema.as_algorithm()``, an :class:`EMAAlgorithm`; a PostHocEMA's is a
:class:`PostHocEMAAlgorithm`. ``EMA`` and ``PostHocEMA`` are re-exported: ``from emakit.algorithms import EMA``
keeps working.
"""

from emakit.algorithms.ema import EMA, EMAAlgorithm
from emakit.algorithms.posthoc import PostHocEMA, PostHocEMAAlgorithm

__all__ = ["EMA", "EMAAlgorithm", "PostHocEMA", "PostHocEMAAlgorithm"]
