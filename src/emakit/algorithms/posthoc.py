"""A :class:`~emakit.PostHocEMA` in emakit's :class:`~emakit.Trainer`: updated at every batch end.

The PostHocEMA knows nothing of events: ``Trainer(algorithms=[phema])`` runs ``phema.as_algorithm()``,
this adapter (one per PostHocEMA)::

    BEFORE_LOAD   phema.attach(model): the averages exist before a sharded checkpoint loads into them
    BATCH_END     phema.update(model): one optimizer step counted; averages and snapshots when due

A checkpoint holds ``phema.state_dict()`` for it, as before the adapter existed. The post-hoc EMA itself,
its profiles and the synthesis are in :mod:`emakit.posthoc`; their names are re-exported here, so
``from emakit.algorithms.posthoc import PostHocEMA, synthesize`` keeps working.
"""

from __future__ import annotations

from typing import Any

from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.core.state import State
from emakit.loggers import Logger
from emakit.posthoc import (
    PostHocEMA,
    add_arguments,
    gamma_from_sigma_rel,
    run,
    sigma_rel_from_gamma,
    snapshot_coefficients,
    snapshots_in,
    synthesize,
)

__all__ = [
    "PostHocEMA",
    "PostHocEMAAlgorithm",
    "add_arguments",
    "gamma_from_sigma_rel",
    "run",
    "sigma_rel_from_gamma",
    "snapshot_coefficients",
    "snapshots_in",
    "synthesize",
]


class PostHocEMAAlgorithm(Algorithm):
    """Runs a :class:`~emakit.PostHocEMA` in a :class:`~emakit.Trainer`: its averages are laid out at
    BEFORE_LOAD and updated at every batch end; it never swaps.

    Made by ``phema.as_algorithm()``, which the Trainer calls. Example::

        phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="1000ba", folder="runs/phema")
        Trainer(..., algorithms=[phema]).fit()       # runs phema.as_algorithm(), this adapter
    """

    def __init__(self, posthoc: PostHocEMA) -> None:
        if not isinstance(posthoc, PostHocEMA):
            raise TypeError(f"PostHocEMAAlgorithm runs an emakit.PostHocEMA, got {type(posthoc).__name__}")
        self.posthoc = posthoc

    def __repr__(self) -> str:
        return f"PostHocEMAAlgorithm(sigma_rels={self.posthoc.sigma_rels})"

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BATCH_END, Event.BEFORE_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.BEFORE_LOAD:  # allocate now: a sharded checkpoint is loaded into the averages in place
            self.posthoc.attach(state.model)
        else:
            self.posthoc.update(state.model)

    def state_dict(self) -> dict[str, Any]:
        """The PostHocEMA's own :meth:`~emakit.PostHocEMA.state_dict`."""
        return self.posthoc.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.posthoc.load_state_dict(state)
