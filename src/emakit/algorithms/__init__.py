"""The trainer's adapters: averages used by hand (:mod:`emakit.ema`) run by emakit's Trainer.

``Trainer(algorithms=[ema])`` runs ``ema.as_algorithm()``, an :class:`EMAAlgorithm`. ``EMA`` is re-exported:
``from emakit.algorithms import EMA`` keeps working.
"""

from emakit.algorithms.ema import EMA, EMAAlgorithm
from emakit.algorithms.posthoc import PostHocEMA

__all__ = ["EMA", "EMAAlgorithm", "PostHocEMA"]
