"""An :class:`~emakit.EMA` in emakit's :class:`~emakit.Trainer`: the events at which it updates and swaps.

The EMA itself knows nothing of events, states or loggers: ``Trainer(algorithms=[ema])`` runs
``ema.as_algorithm()``, this adapter (one per EMA), which translates the trainer's events into the
EMA's by-hand calls::

    INIT                 under FSDP: ema.remember_structure(model) (ema_model needs it once the model is sharded)
    BEFORE_LOAD          ema.attach(model): the averages exist before a sharded checkpoint loads into them
    FIT_START            ema.set_run_length(batches of max_duration); a resumed average binds the model
    BATCH_END            an update event when update_interval is in 'ba' (EPOCH_END when in 'ep'): the trainer's
                         clock and ema_start (any unit), logging ema/num_updates and ema/smoothing
    EVAL_START/EVAL_END  ema.get_ema_model(model) / ema.get_training_model(model), once the average started

A checkpoint holds ``ema.state_dict()`` for it, as before the adapter existed.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.core.state import State
from emakit.ema import EMA
from emakit.loggers import Logger
from emakit.time import TimeUnit

__all__ = ["EMA", "EMAAlgorithm"]  # EMA: `from emakit.algorithms.ema import EMA` keeps working


class EMAAlgorithm(Algorithm):
    """Runs an :class:`~emakit.EMA` in a :class:`~emakit.Trainer`: updates at batch (or epoch) ends, the average
    swapped in for evaluation.

    Made by ``ema.as_algorithm()``, which the Trainer calls for every entry of ``algorithms`` that is not an
    :class:`~emakit.Algorithm` already. Example::

        ema = EMA(half_life="50ba")
        Trainer(..., algorithms=[ema])          # runs ema.as_algorithm(), this adapter
        ema.as_algorithm() is ema.as_algorithm()   # True: one adapter per EMA
    """

    def __init__(self, ema: EMA) -> None:
        if not isinstance(ema, EMA):
            raise TypeError(f"EMAAlgorithm runs an emakit.EMA, got {type(ema).__name__}: {ema!r}")
        self.ema = ema

    def __repr__(self) -> str:
        return f"EMAAlgorithm({self.ema!r})"

    def match(self, event: Event, state: State) -> bool:
        ema = self.ema
        if event in (Event.EVAL_START, Event.EVAL_END):
            return ema.started
        update_event = Event.BATCH_END if ema.update_interval.unit is TimeUnit.BATCH else Event.EPOCH_END
        return event in (update_event, Event.INIT, Event.BEFORE_LOAD, Event.FIT_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        ema = self.ema
        if event is Event.INIT:
            if state.parallelism == "fsdp":  # FSDP refuses deepcopy: ema_model is built from this weightless copy
                ema.remember_structure(state.model)
        elif event is Event.BEFORE_LOAD:  # allocate now: a sharded checkpoint is loaded into the average in place
            ema.attach(state.model)
        elif event is Event.FIT_START:
            self._check_start(state)
            if ema.started:  # resumed: bind the model now, so ema_model and exports work before the next update
                ema.attach(state.model)
        elif event is Event.EVAL_START:
            ema.get_ema_model(state.model)
        elif event is Event.EVAL_END:
            ema.get_training_model(state.model)
        else:
            count = state.timestamp.get(ema.update_interval.unit)
            if ema.update_at(state.model, count, state.reached(ema.ema_start)):
                metrics: dict[str, float] = {"ema/num_updates": ema.num_updates}
                if ema.last_smoothing is not None:
                    metrics["ema/smoothing"] = ema.last_smoothing
                logger.log_metrics(metrics)

    def _check_start(self, state: State) -> None:
        """Tell the EMA the run's length in batches; warn when ``ema_start`` lies beyond it."""
        ema = self.ema
        start, end = state.in_batches(ema.ema_start), state.in_batches(state.max_duration)
        if end is None:
            if ema.half_life is not None and ema.half_life.unit is TimeUnit.DURATION:
                raise ValueError(
                    f"half_life='{ema.half_life}' is a fraction of the run, but max_duration='{state.max_duration}' "
                    "does not say how many batches the run has: give max_duration in 'ba' or 'ep'"
                )
            return
        if start is not None and start > end:
            warnings.warn(
                f"EMA ema_start='{ema.ema_start}' lies beyond max_duration='{state.max_duration}': "
                "the average will never start",
                stacklevel=2,
            )
        ema.set_run_length(end, start, state.in_batches(ema.update_interval))

    @property
    def state_is_per_rank(self) -> bool:
        """The EMA's :attr:`~emakit.EMA.state_is_per_rank` (``shard_over_ranks`` on several ranks)."""
        return self.ema.state_is_per_rank

    def training_weights(self, state: State) -> contextlib.AbstractContextManager:
        """Inside, ``state.model`` holds its training weights, even during an evaluation."""
        return self.ema.training_weights(state.model)

    def evaluation_weights(self, state: State) -> dict[str, contextlib.AbstractContextManager]:
        """Every average, once they have started, under its label (``"ema@50ba"``)."""
        ema = self.ema
        if not ema.started:
            return {}
        return {label: ema.ema_weights(state.model, i) for i, label in enumerate(ema.labels)}

    def state_dict(self) -> dict[str, Any]:
        """The EMA's own :meth:`~emakit.EMA.state_dict`: checkpoints hold what they held before the adapter."""
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
