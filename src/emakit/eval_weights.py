"""Which weights an evaluation measures: ``eval_weights``, one keyword for emakit's Trainer and the integrations.

``Trainer(eval_weights=...)``, ``EMACallback(eval_weights=...)`` (Lightning) and ``EMATrainer(eval_weights=...)``
(Hugging Face) take the same values::

    "ema"        the average (the default); before it starts, the training weights. The usual metric names.
    "training"   the training weights. The usual metric names.
    "both"       the average under the usual names and the training weights under the same names marked
                 "training", measured in one evaluation: one history entry, one log record, one event

The mark goes where each framework puts a qualifier (README, "Which weights are evaluated", has the table)::

    emakit Trainer           loss       loss/training         (and each average: loss/ema@50ba)
    Hugging Face Trainer     eval_loss  eval_training_loss    (the metric_key_prefix gains "_training")
    Lightning                val_loss   refused: a second validation pass would run the module's own
                                        validation code again (emakit.integrations.lightning says why)

Example::

    >>> check_eval_weights("both")
    'both'
    >>> check_eval_weights("average")
    Traceback (most recent call last):
    ValueError: eval_weights='average' must be one of 'ema', 'training', 'both'
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["EVAL_WEIGHTS", "TRAINING", "check_eval_weights"]

EVAL_WEIGHTS = ("ema", "training", "both")
"""The values of ``eval_weights``, everywhere it is taken."""

TRAINING = "training"
"""The mark of the training weights' metrics under ``eval_weights="both"``."""


def check_eval_weights(value: object, allowed: Sequence[str] = EVAL_WEIGHTS) -> str:
    """``value`` when it is one of ``allowed``; else ValueError naming it and the allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"eval_weights={value!r} must be one of {', '.join(map(repr, allowed))}")
    return value
