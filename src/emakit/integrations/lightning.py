"""An EMA of a LightningModule's weights as a plain Lightning callback: ``pip install emakit[lightning]``.

Per optimizer step (``trainer.global_step`` advancing: gradient accumulation and several
optimizers count steps, not micro-batches), in ``on_train_batch_end``::

    first step:   ema = w                              (or at the first step at or after ema_start)
    later steps:  ema = s * ema + (1 - s) * w,         s = 2 ** (-(update_interval / half_life))

An update event is due every ``update_interval`` optimizer steps; with ``update_interval`` in epochs (``"1ep"``)
once per ``update_interval`` epochs, at the epoch's last optimizer step (before the epoch's validation); with
``should_update(step, epoch)`` at the steps where it returns True (:class:`EMACallback`).

``ema_start`` may be in optimizer steps (``"100ba"``), epochs (``"2ep"``: the first optimizer step of
``trainer.current_epoch == 2``, counted from 0) or a fraction of the run (``"0.3dur"``: of
``trainer.estimated_stepping_batches``). Each ``fit`` counts its own optimizer steps, so one callback
can serve several ``fit`` calls (new ``Trainer`` or not): the average carries on across them. (An
average not started yet then starts by the EMA's own count of optimizer steps, over all fits, for
``ba`` and ``dur``, and by the running trainer's ``current_epoch`` for ``ep``.)

Validation and test run with the average swapped in (``on_*_epoch_start`` .. ``on_*_epoch_end``;
nothing before the average starts, so the sanity check sees the training weights), or on the training
weights with ``eval_weights="training"`` (:mod:`emakit.eval_weights`; ``"both"`` is refused: see
:class:`EMACallback`); checkpoints
hold the training weights (by default), and the callback's state (the average and its counters) rides in
them, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly (with ``save_best="average"`` they hold the average
where the module's weights go, and the training weights in the callback's state: :mod:`.lightning_best`).
Training ends on the training weights (``end_with="average"``: on the average): export the average with
:meth:`EMACallback.save_ema_weights` or use :attr:`EMACallback.ema_model`.

Example::

    from lightning.pytorch import Trainer
    from emakit.integrations.lightning import EMACallback

    ema = EMACallback(half_life="100ba")
    Trainer(max_epochs=10, callbacks=[ema]).fit(module, train_loader, val_loader)  # validates with the average
    ema.save_ema_weights("ema.safetensors")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from emakit.deprecated import RenamedKeyword
from emakit.ema import EMA
from emakit.eval_weights import check_eval_weights
from emakit.integrations.lightning_best import average_into, module_weights, refuse_sharded, training_back
from emakit.integrations.lightning_sharded import load_shards, place_shards
from emakit.time import Time, TimeUnit

__all__ = ["EMACallback"]

EVALUATE_WITH_EMA = RenamedKeyword(
    "EMACallback", "evaluate_with_ema", "eval_weights", {True: "ema", False: "training"}, default="ema"
)


class EMACallback(pl.Callback):
    """Keeps an :class:`~emakit.EMA` of the LightningModule's weights and evaluates with it.

    Args:
        ema: an :class:`~emakit.EMA` to run; or leave it out and pass ``EMA``'s arguments
            (``half_life``, ``smoothing``, ``ema_start``, ``update_interval``, ``ema_dtype``, ...)
            as keywords. Time in ``ba`` counts optimizer steps, ``ep`` the trainer's epochs (from 0) and
            ``dur`` fractions of ``trainer.estimated_stepping_batches``.
        eval_weights: what validation and test measure: ``"ema"`` (default) the average once it has started,
            ``"training"`` the training weights; the LightningModule's own metric names either way.
            ``"both"``, which emakit's Trainer and ``EMATrainer`` take, is refused here: Lightning runs the
            module's ``validation_step``, its ``self.log`` calls and ``on_validation_epoch_end`` once per
            validation, and a callback running them a second time for the other weights would feed both into the
            module's own accumulators (torchmetrics objects, outputs kept for the epoch end), which run after the
            callback's epoch end. To measure the other weights too, validate again with the attribute changed:
            ``callback.eval_weights = "training"; trainer.validate(module, loader)``.
        end_with: what the LightningModule holds after ``fit``: ``"training"`` (default) its training weights,
            ``"average"`` the average, copied in at ``on_fit_end`` (checkpoints written during training still hold
            the training weights); an average not started by then is not copied, with a warning.
        should_update: ``should_update(trainer.global_step, trainer.current_epoch) -> bool``, asked after each
            optimizer step: an update event happens only where it returns True, Lightning's
            ``WeightAveraging.should_update`` rule. It replaces ``update_interval``'s rule (which must stay ``"1ba"``),
            so each True is one update with the EMA's smoothing ``s``: ``ema = s * ema + (1 - s) * w`` (a half-life
            in ``ba`` then counts these updates). ``ema_start`` still applies: the average starts at the first True
            at or after it.
        save_best: what a checkpoint's ``"state_dict"`` holds once the average has started: ``"training"``
            (default) the training weights, ``"average"`` the average, which validation measured, so that
            ``ModelCheckpoint(monitor=...)`` keeps the weights it ranked; the training weights then ride in the
            callback's state and go back into the module on ``trainer.fit(..., ckpt_path=...)``, which resumes exactly
            (:mod:`emakit.integrations.lightning_best`). Refused under sharding strategies.
        evaluate_with_ema: deprecated: ``eval_weights="ema"`` (True) or ``"training"`` (False).

    ``update_interval`` in epochs (``EMACallback(half_life="2ep", update_interval="1ep")``: ``s = 2 ** (-1 / 2)``)
    updates once per ``update_interval`` epochs (``(current_epoch + 1) % interval == 0``), with the weights after the
    epoch's last optimizer step, before the epoch-end validation; an epoch cut short (``max_steps``, early stopping)
    updates at ``on_train_epoch_end``. ``ema_start`` then counts at the update: ``"2ep"`` starts the average at the end
    of the second epoch. A half-life in ``ba`` or ``dur`` with an interval in ``ep`` is refused by :class:`~emakit.EMA`.

    Example::

        ema = EMACallback(half_life="100ba")                     # validation measures the average
        trainer = Trainer(max_epochs=10, callbacks=[ema])
        trainer.fit(module, train_loader, val_loader)
        ema.eval_weights = "training"
        trainer.validate(module, val_loader)                     # the training weights, same metric names
    """

    evaluate_with_ema = EVALUATE_WITH_EMA.attribute()

    def __init__(
        self,
        ema: EMA | None = None,
        *,
        eval_weights: str = "ema",
        end_with: str = "training",
        should_update: Callable[[int, int], bool] | None = None,
        save_best: str = "training",
        evaluate_with_ema: bool | None = None,
        **ema_arguments: Any,
    ) -> None:
        if ema is not None and ema_arguments:
            raise ValueError(f"pass an EMA or EMA's arguments, not both: got ema and {sorted(ema_arguments)}")
        if ema is not None and not isinstance(ema, EMA):
            raise ValueError(f"ema must be an emakit.EMA, got {type(ema).__name__}")
        eval_weights = EVALUATE_WITH_EMA.resolve(evaluate_with_ema, eval_weights, owner=type(self).__name__)
        if eval_weights == "both":
            raise ValueError(
                "EMACallback(eval_weights='both') is not supported in Lightning: a second validation pass from a "
                "callback would run the module's validation_step and logging again and mix both weights into its "
                "metrics; use eval_weights='ema' (the average) or 'training', and validate again with the other "
                "(callback.eval_weights = 'training'; trainer.validate(module, loader))"
            )
        self.eval_weights = check_eval_weights(eval_weights, ("ema", "training"))
        self.ema = ema if ema is not None else EMA(**ema_arguments)
        self.end_with = _one_of("end_with", end_with, ("training", "average"))
        self.save_best = _one_of("save_best", save_best, ("training", "average"))
        interval = self.ema.update_interval
        if should_update is not None and (not callable(should_update) or interval != Time(1, TimeUnit.BATCH)):
            raise ValueError(
                f"should_update={should_update!r} must be a callable (step, epoch) -> bool, or None; it replaces "
                f"update_interval's rule, so update_interval must be '1ba' (got '{interval}': give the half-life in "
                "'ba', or smoothing=)"
            )
        self.should_update = should_update
        self._per_epoch = interval.unit is TimeUnit.EPOCH  # update at epoch ends
        if not self._per_epoch and interval.unit is not TimeUnit.BATCH:
            raise ValueError(
                f"update_interval='{interval}': EMACallback counts optimizer steps ('ba') or epochs ('ep')"
            )
        self._last_step = 0  # trainer.global_step of the running fit at the last update (or at its start)
        self._last_epoch = -1  # trainer.current_epoch of the running fit at the last epoch-end update
        self._restored: tuple[int, int] | None = None  # (last_step, last_epoch) of a checkpoint loaded into the fit

    @property
    def state_key(self) -> str:
        half_life = self.ema.half_life
        of_run = half_life is not None and half_life.unit is TimeUnit.DURATION  # its smoothing comes at fit start
        rate = str(half_life) if of_run else self.ema.smoothing
        key: dict[str, Any] = {"smoothing": rate, "update_interval": str(self.ema.update_interval)}
        kinds = self.ema.averages.kinds
        if rate is None or kinds != ("exponential",) * len(kinds):  # schedules, uniform and windowed averages
            key["averages"] = ",".join(self.ema.labels)  # only then: exponential averages keep their keys
        if self.should_update is not None:  # only then: the key of every other configuration stays as it was
            key["should_update"] = getattr(self.should_update, "__qualname__", type(self.should_update).__name__)
        return self._generate_state_key(**key)  # save_best and end_with stay out: the state is the same

    @property
    def ema_model(self) -> nn.Module:
        """A module of the LightningModule's type holding the average (see :attr:`emakit.EMA.ema_model`)."""
        return self.ema.ema_model

    def save_ema_weights(self, path: str | Path) -> Path:
        """Write the average as safetensors, keyed like the module's ``state_dict`` (rank 0 writes)."""
        return self.ema.save_ema_weights(path)

    # ------------------------------------------------------------- training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a checkpoint loaded into an earlier ``fit``/``validate``: this run restores its own, if any.
        ``save_best="average"`` under a sharding strategy is refused here."""
        self._restored = None
        if self.save_best == "average":
            refuse_sharded(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind the average to the module (now on its device) and tell the EMA the run's optimizer steps."""
        self.ema.attach(pl_module)  # the module is on its device now; a resumed average applies here
        steps = trainer.estimated_stepping_batches  # optimizer steps; inf when the run has no set length
        if math.isfinite(steps):
            self.ema.set_run_length(steps)  # 'dur' half-lives and starts get their steps; too long ones, a warning

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting this fit's optimizer steps from ``trainer.global_step``.

        Runs after everything a resume restores, whatever the strategy: the callback's state (before
        ``on_fit_start``, or after it when ``strategy.restore_checkpoint_after_setup``) and
        ``trainer.global_step`` (after ``on_fit_start``). A fresh ``Trainer`` starts at step 0, so a
        second ``fit`` with this callback updates again instead of waiting for its old step count.
        """
        step = trainer.global_step
        restored, self._restored = self._restored, None
        if restored is not None and restored[0] < step and not self._per_epoch:
            # the checkpoint was written after optimizer step `step` but before this callback averaged it
            # (by a callback listed ahead of this one): the module holds that step's weights, average them now
            self._step(trainer, pl_module)
        self._last_step = step
        self._last_epoch = restored[1] if restored is not None else trainer.current_epoch - 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count an optimizer step (when ``trainer.global_step`` advanced in this batch): an update event per step, per
        True of ``should_update``, or at the epoch's last step with ``update_interval`` in epochs."""
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            if not self._per_epoch:
                self._step(trainer, pl_module)
            elif _last_batch_of_epoch(trainer):
                self._epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The update of an epoch cut short (``max_steps``, early stopping), with ``update_interval`` in epochs."""
        if self._per_epoch:
            self._epoch_end(trainer, pl_module)

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One optimizer step: an update event when due (every step by default; where ``should_update`` says)."""
        epoch = trainer.current_epoch  # for ema_start in 'ep'
        due = self.should_update is None or bool(self.should_update(trainer.global_step, epoch))
        self.ema.update(pl_module, epoch=epoch, due=due)  # update_interval is 1ba with should_update

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch ``trainer.current_epoch`` ended (once each): update event number ``current_epoch + 1``, due when a
        multiple of ``update_interval`` and at or after ``ema_start`` (``ep``: epochs done, ``ba``: optimizer steps)."""
        epoch = trainer.current_epoch
        if epoch <= self._last_epoch:
            return
        self._last_epoch = epoch
        done = epoch + 1
        self.ema.update_at(pl_module, done, self.ema.start_reached(trainer.global_step, done))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``end_with="average"``, copy the average into the module for good (``EMA.copy_to``).

        ``on_fit_end``, not ``on_train_end``: it runs after every callback's ``on_train_end``, where checkpoints are
        still written (``ModelCheckpoint(save_last=True)`` writes its last one there), so none of them can catch the
        average in place of the training weights. (It also runs after the strategy's teardown moved the module to
        the CPU; the average follows the module's tensors wherever they went.)
        """
        if self.end_with != "average":
            return
        if not self.ema.started:
            warnings.warn(
                f"EMACallback(end_with='average'): the average has not started (ema_start='{self.ema.ema_start}' was "
                f"not reached in {trainer.global_step} optimizer steps, {trainer.current_epoch + 1} epochs), so the "
                "module keeps its training weights",
                UserWarning,
                stacklevel=2,
            )
            return
        self.ema.get_training_model(pl_module)
        self.ema.copy_to(pl_module)

    # ----------------------------------------------------------- evaluation
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.eval_weights == "ema" and self.ema.started and not trainer.sanity_checking:
            self.ema.get_ema_model(pl_module)

    def _swap_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ema.get_training_model(pl_module)

    on_validation_epoch_start = _swap_in
    on_validation_epoch_end = _swap_out
    on_test_epoch_start = _swap_in
    on_test_epoch_end = _swap_out

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.ema.get_training_model(pl_module)  # the training weights go back even when evaluation raised

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written while the average is swapped in (from inside evaluation) gets the training weights
        (``save_best="average"``: the average, once started, and the training weights in the callback's state);
        sharded averages (FSDP2 under ``ModelParallelStrategy``, ZeRO-3 under ``DeepSpeedStrategy``) are saved so that
        every rank's part resumes (:mod:`emakit.integrations.lightning_sharded`)."""
        if self.save_best == "average" and self.ema.started:
            average_into(checkpoint, self.state_key, trainer, self.ema, pl_module)
        elif self.ema.swapped:  # as the strategy saves them (collective)
            checkpoint["state_dict"] = module_weights(trainer, self.ema, pl_module, average=False)
        place_shards(trainer, checkpoint, self.state_key, self.ema)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Put back training weights saved beside the average (``save_best="average"``: Lightning loaded the average
        into the module already); read the average's shards saved beside the model's in a checkpoint folder."""
        training_back(checkpoint, self.state_key, trainer, pl_module)

        def laid_out_state() -> dict[str, Any]:
            self.ema.attach(pl_module)  # the sharded module (a validate or test run has not attached it yet)
            return self.state_dict()

        load_shards(trainer, checkpoint, self.state_key, laid_out_state)

    def state_dict(self) -> dict[str, Any]:
        state = {"ema": self.ema.checkpoint_state(), "last_step": self._last_step}  # shard_over_ranks: every rank's
        if self._per_epoch:
            state["last_epoch"] = self._last_epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"ema", "last_step"} - set(state_dict)
        if missing:
            raise ValueError(f"EMACallback state lacks {sorted(missing)}; got the keys {sorted(state_dict)}")
        self.ema.load_state_dict(state_dict["ema"])
        self._last_step, self._last_epoch = int(state_dict["last_step"]), int(state_dict.get("last_epoch", -1))
        self._restored = (self._last_step, self._last_epoch)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of ``allowed``; else ValueError naming it and the allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"EMACallback({name}={value!r}): must be one of {', '.join(map(repr, allowed))}")
    return value


def _last_batch_of_epoch(trainer: pl.Trainer) -> bool:
    """Whether the running batch is the epoch's last (``limit_train_batches`` counted): its optimizer step ends it."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches
