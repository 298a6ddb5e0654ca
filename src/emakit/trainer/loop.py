"""The training loop of :class:`~emakit.Trainer`: fit, its epochs and batches, and the events fired on the way.

::

    fit:    BEFORE_LOAD, (resume), FIT_START, epochs until max_duration, (a last evaluation), FIT_END
    epoch:  EPOCH_START, batches, EPOCH_END, [evaluation], EPOCH_CHECKPOINT, [checkpoint]
    batch:  BATCH_START, forward, AFTER_FORWARD, loss, AFTER_LOSS, backward, AFTER_BACKWARD,
            optimizer and scheduler steps, BATCH_END, [evaluation], BATCH_CHECKPOINT, [checkpoint]

Each epoch's batches come in an order fixed by (seed, epoch), so a resumed run sees what an uninterrupted one sees.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from emakit import distributed
from emakit.core import Engine, Event, State
from emakit.loggers import Logger
from emakit.time import Time, TimeUnit
from emakit.tracked import unwrap
from emakit.trainer.batches import batch_size, to_device
from emakit.trainer.rng import set_rng_state

__all__ = ["SEED_STRIDE", "TrainerLoop"]

SEED_STRIDE = 1_000_003  # epoch e of a run seeded s shuffles with the permutation seeded s * SEED_STRIDE + e


class TrainerLoop:
    """:class:`~emakit.Trainer`'s loop: :meth:`fit`, one epoch, one batch; evaluations and checkpoints at their
    intervals (:mod:`emakit.trainer.evaluation`, :mod:`emakit.trainer.resume`)."""

    state: State
    engine: Engine
    logger: Logger
    seed: int
    train_dataloader: Iterable
    eval_dataloader: Iterable | None
    eval_interval: Time
    save_interval: Time
    progress_bar: bool
    _train_module: nn.Module
    _scaler: torch.amp.GradScaler | None
    _user_sampler: Any
    _epoch_rng: torch.Tensor | None
    _resume_rng: dict[str, Any] | None

    _resume: Callable[[], None]  # TrainerResume
    save_checkpoint: Callable[[], Path | None]  # TrainerResume
    _eval_if_possible: Callable[[], None]  # TrainerEvaluation
    eval: Callable[..., dict[str, float]]  # TrainerEvaluation

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.state.precision == "amp_bf16":
            return torch.autocast(self.state.device.type, dtype=torch.bfloat16)
        if self.state.precision == "amp_fp16":
            return torch.autocast(self.state.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def fit(self) -> None:
        """Train until ``max_duration``, evaluating every ``eval_interval`` and once more at the end."""
        with distributed.explain_failures():
            self._fit()

    def _fit(self) -> None:
        state, run = self.state, self.engine.run_event
        run(Event.BEFORE_LOAD)
        self._resume()
        run(Event.FIT_START)
        while not state.is_done():
            self._train_epoch()
        if self.eval_dataloader is not None and (
            not state.eval_history or state.eval_history[-1]["batch"] != state.timestamp.batch
        ):
            self.eval()
        run(Event.FIT_END)

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches, in an order fixed by (seed, epoch), after those already trained on."""
        timestamp = self.state.timestamp
        sampler = getattr(self.train_dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + timestamp.epoch)
        elif isinstance(sampler, DistributedSampler):
            if sampler is not self._user_sampler:
                sampler.seed = self.seed * SEED_STRIDE  # the trainer's own: follows a seed loaded from a checkpoint
            sampler.set_epoch(timestamp.epoch)
        if self._epoch_rng is not None and self._resume_rng is not None:
            torch.set_rng_state(self._epoch_rng)  # as when this epoch's iterator was first made
        else:
            self._epoch_rng = torch.get_rng_state()
        batches = iter(self.train_dataloader)
        for _ in range(timestamp.batch_in_epoch):  # resuming mid-epoch: pass over what was trained on
            next(batches)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        return batches

    def _train_epoch(self) -> None:
        state, run = self.state, self.engine.run_event
        timestamp = state.timestamp
        if timestamp.batch_in_epoch == 0:
            run(Event.EPOCH_START)
        show = self.progress_bar and sys.stderr.isatty() and distributed.is_main()
        with tqdm(
            total=state.batches_per_epoch,
            initial=timestamp.batch_in_epoch,
            disable=not show,
            desc=f"epoch {timestamp.epoch + 1}",
            leave=False,
        ) as bar:
            for batch in self._epoch_batches():
                loss = self._train_batch(batch)
                bar.update(1)
                if show:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if state.is_done() and timestamp.batch_in_epoch != state.batches_per_epoch:
                    return
        if timestamp.batch_in_epoch == 0:
            raise ValueError("train_dataloader yielded no batches in an epoch")
        timestamp.epoch += 1
        timestamp.batch_in_epoch = 0
        run(Event.EPOCH_END)
        if self.eval_interval.unit is TimeUnit.EPOCH and timestamp.epoch % self.eval_interval.value == 0:
            self._eval_if_possible()
        run(Event.EPOCH_CHECKPOINT)
        if self.save_interval.unit is TimeUnit.EPOCH and timestamp.epoch % self.save_interval.value == 0:
            self.save_checkpoint()

    def _train_batch(self, batch: Any) -> float:
        state, run = self.state, self.engine.run_event
        state.batch = to_device(batch, state.device)
        run(Event.BATCH_START)
        module = unwrap(state.model)
        with self._autocast():
            state.outputs = self._train_module(state.batch)  # the DDP wrapper, where there is one
            run(Event.AFTER_FORWARD)
            loss_of = cast("Callable[[Any, Any], torch.Tensor]", module.loss)  # the model has one (check_model)
            state.loss = loss_of(state.outputs, state.batch)
            run(Event.AFTER_LOSS)
        scaler = self._scaler
        (scaler.scale(state.loss) if scaler is not None else state.loss).backward()
        run(Event.AFTER_BACKWARD)
        for optimizer in state.optimizers:
            if scaler is not None:
                scaler.step(optimizer)  # unscales the gradients; skips the step when they hold inf/NaN
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        for scheduler in state.schedulers:
            scheduler.step()
        loss = float(state.loss.detach())
        timestamp = state.timestamp
        timestamp.batch += 1
        timestamp.batch_in_epoch += 1
        num_tokens = getattr(module, "num_tokens", None)
        counts = [batch_size(state.batch), int(num_tokens(state.batch)) if callable(num_tokens) else 0]
        samples, tokens = distributed.sum_over_ranks(counts, state.device)  # every rank's, so all stop together
        timestamp.sample += int(samples)
        timestamp.token += int(tokens)
        self.logger.log_metrics({"loss/train": loss})
        run(Event.BATCH_END)
        if self.eval_interval.unit is TimeUnit.BATCH and timestamp.batch % self.eval_interval.value == 0:
            self._eval_if_possible()
        run(Event.BATCH_CHECKPOINT)
        if self.save_interval.unit is TimeUnit.BATCH and timestamp.batch % self.save_interval.value == 0:
            self.save_checkpoint()
        state.batch = state.outputs = state.loss = None
        return loss
