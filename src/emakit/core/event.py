"""The points of a training run at which algorithms and callbacks run, in the order the trainer fires them."""

from __future__ import annotations

import enum

__all__ = ["Event"]


class Event(str, enum.Enum):
    """A point in the training loop. The value is the name of the :class:`~emakit.Callback` method it calls.

    Order within a run::

        INIT                                  (once, in Trainer.__init__, before the model is wrapped for DDP/FSDP)
        BEFORE_LOAD                           (at the start of fit, after wrapping, before a checkpoint is loaded)
        FIT_START
          EPOCH_START
            BATCH_START, AFTER_FORWARD, AFTER_LOSS, AFTER_BACKWARD   (optimizer step after this)
            BATCH_END, [evaluation], BATCH_CHECKPOINT                 (per batch)
          EPOCH_END, [evaluation], EPOCH_CHECKPOINT
        FIT_END

    An evaluation is EVAL_START, EVAL_BATCH_END per batch, EVAL_END.

    Algorithms run in the order given at every event except the *closing* ones (``*_END``):
    there they run in reverse, so that what opens in order closes in reverse (two EMAs swap in
    A, B at EVAL_START and out B, A at EVAL_END).
    """

    INIT = "init"
    BEFORE_LOAD = "before_load"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_FORWARD = "after_forward"
    AFTER_LOSS = "after_loss"
    AFTER_BACKWARD = "after_backward"
    BATCH_END = "batch_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EPOCH_END = "epoch_end"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    EVAL_START = "eval_start"
    EVAL_BATCH_END = "eval_batch_end"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"

    @property
    def is_closing(self) -> bool:
        """Whether this event closes what an earlier one opened (``*_END``): algorithms then run in reverse."""
        return self.name.endswith("_END")

    def __repr__(self) -> str:
        return f"Event.{self.name}"
