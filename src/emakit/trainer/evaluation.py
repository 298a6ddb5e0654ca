"""Evaluation in :class:`~emakit.Trainer`: :meth:`~emakit.Trainer.eval`, between EVAL_START and EVAL_END.

:class:`TrainerEvaluation` is the Trainer's part (the events, the weights measured, the history and the log);
:func:`sum_metrics` the sums of the loss and the model's metrics over a dataloader, reduced over all ranks;
:func:`fsdp_eval_forwards` how many forwards every rank runs when FSDP needs all of them in each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from emakit import distributed
from emakit.core import Engine, Event, State
from emakit.eval_weights import TRAINING
from emakit.loggers import Logger
from emakit.tracked import unwrap
from emakit.trainer.batches import batch_size, to_device

__all__ = ["TrainerEvaluation", "fsdp_eval_forwards", "sum_metrics"]


def sum_metrics(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    after_batch: Callable[[Any, Any], None],
    min_forwards: int = 0,
) -> dict[str, list[float]]:
    """``{name: [total, count]}`` of the loss and ``model.metrics`` over ``dataloader``, summed over all ranks.

    The loss total is ``loss * batch size`` per batch, so ``total / count`` is the per-sample mean.
    ``after_batch(batch, outputs)`` runs after each batch. With ``min_forwards`` the model runs that many
    forwards at least (extra ones on the last batch, results unused): FSDP needs every rank in every forward.
    """
    forward = distributed.forward_module(model)  # not through DDP: ranks may run different numbers of batches
    module = unwrap(model)
    metrics = getattr(module, "metrics", None)
    totals: dict[str, list[float]] = {}
    batch, forwards = None, 0
    for batch in dataloader:
        batch = to_device(batch, device)
        with autocast():
            outputs = forward(batch)
            count = batch_size(batch)
            loss_of = cast("Callable[[Any, Any], torch.Tensor]", module.loss)  # the model has one (check_model)
            sums = {"loss": (loss_of(outputs, batch) * count, count)}
            if callable(metrics):
                sums.update(metrics(outputs, batch))
        for name, (total, n) in sums.items():
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += int(n)
        after_batch(batch, outputs)
        forwards += 1
    for _ in range(min_forwards - forwards):
        with autocast():
            forward(batch)
    totals = distributed.all_reduce_sums(totals, device)
    if not totals:
        raise ValueError("the eval dataloader yielded no batches")
    return totals


def fsdp_eval_forwards(dataloader: Iterable, device: torch.device) -> int:
    """How many eval forwards every rank runs under FSDP: the most batches any rank has."""
    try:
        batches = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"with FSDP the eval dataloader needs a len() (every rank must run as many forwards), "
            f"got a {type(dataloader).__name__}"
        ) from None
    forwards = distributed.max_over_ranks(batches, device)
    if batches == 0 and forwards > 0:
        raise ValueError(
            f"rank {distributed.rank()} has no eval batches while others have {forwards}: with FSDP every "
            "rank needs at least one (give the eval set at least as many samples as there are ranks)"
        )
    return forwards


def _means(totals: dict[str, list[float]]) -> dict[str, float]:
    return {name: total / max(count, 1) for name, (total, count) in totals.items()}


def _ignore(*_: Any) -> None:
    """An evaluation batch's outputs, unused."""


class TrainerEvaluation:
    """:class:`~emakit.Trainer`'s evaluation: :meth:`eval`, of the weights ``eval_weights`` names."""

    state: State
    engine: Engine
    logger: Logger
    eval_dataloader: Iterable | None
    eval_weights: str  # emakit.eval_weights: "ema", "training" or "both"
    _fsdp: bool
    _autocast: Callable[[], contextlib.AbstractContextManager]  # TrainerLoop

    def _eval_if_possible(self) -> None:
        if self.eval_dataloader is not None:
            self.eval()

    def eval(self, dataloader: Iterable | None = None) -> dict[str, float]:
        """Metrics over ``dataloader`` (default: ``eval_dataloader``): loss and the model's metrics.

        With an EMA among the algorithms, these are the EMA weights' metrics (``eval_weights="ema"``), the
        training weights' (``"training"``), or both (``"both"``: the training weights' as ``loss/training``, ...,
        and each average's as ``loss/ema@50ba``, ...); the training weights are back when this returns, also if
        evaluation raises. Example::

            trainer.eval()   # {"loss": 0.31, "accuracy": 0.93}, or with eval_weights="both" also
                             # {"loss/training": 0.35, "accuracy/training": 0.91, "loss/ema@50ba": 0.31, ...}

        With several processes every rank evaluates its share (a ``DataLoader`` with a default sampler is split
        so that each sample is evaluated exactly once) and the sums are reduced over the ranks, so the metrics
        are those of one process over the whole set. Call it on every rank.
        """
        with distributed.explain_failures(), torch.no_grad():
            return self._eval(dataloader)

    def _eval(self, dataloader: Iterable | None) -> dict[str, float]:
        dataloader = self.eval_dataloader if dataloader is None else distributed.shard_eval_loader(dataloader)
        if dataloader is None:
            raise ValueError("no eval_dataloader: pass one to Trainer(...) or to eval(dataloader)")
        state, run = self.state, self.engine.run_event
        model = state.model
        was_training = model.training
        model.eval()
        run(Event.EVAL_START)
        try:
            # FSDP's forward gathers weights from every rank: all ranks run as many forwards as the busiest one.
            forwards = fsdp_eval_forwards(dataloader, state.device) if self._fsdp else 0

            def after_batch(batch: Any, outputs: Any) -> None:
                state.batch, state.outputs = batch, outputs
                run(Event.EVAL_BATCH_END)

            with self._training_weights() if self.eval_weights == "training" else contextlib.nullcontext():
                metrics = _means(sum_metrics(model, dataloader, state.device, self._autocast, after_batch, forwards))
            if self.eval_weights == "both":
                metrics.update(self._eval_other_weights(dataloader, forwards))
            state.eval_metrics = metrics
        except BaseException:
            run(Event.EVAL_END)
            model.train(was_training)
            raise
        state.batch = state.outputs = None
        timestamp = state.timestamp
        state.eval_history.append({"batch": timestamp.batch, "epoch": timestamp.epoch, **state.eval_metrics})
        self.logger.log_metrics({f"eval/{k}": v for k, v in state.eval_metrics.items()})
        run(Event.EVAL_END)
        model.train(was_training)
        return dict(state.eval_metrics)

    @contextlib.contextmanager
    def _training_weights(self) -> Iterator[None]:
        """Inside, the model holds its training weights: every algorithm's swap taken out, the last one first."""
        with contextlib.ExitStack() as stack:
            for algorithm in reversed(self.engine.algorithms):
                stack.enter_context(algorithm.training_weights(self.state))
            yield

    def _eval_other_weights(self, dataloader: Iterable, forwards: int) -> dict[str, float]:
        """Metrics of the training weights and of the algorithms' other weights, as ``NAME/LABEL``."""
        state = self.state
        metrics: dict[str, float] = {}
        with self._training_weights():
            weights: dict[str, contextlib.AbstractContextManager] = {TRAINING: contextlib.nullcontext()}
            for algorithm in self.engine.algorithms:
                for label, context in algorithm.evaluation_weights(state).items():
                    unique = label if label not in weights else f"{label}#{len(weights)}"
                    weights[unique] = context
            for label, context in weights.items():
                with context:
                    totals = sum_metrics(state.model, dataloader, state.device, self._autocast, _ignore, forwards)
                metrics.update({f"{name}/{label}": value for name, value in _means(totals).items()})
        return metrics
