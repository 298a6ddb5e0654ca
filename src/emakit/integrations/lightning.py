"""An EMA of a LightningModule's weights as a plain Lightning callback: ``pip install emakit[lightning]``.

Per optimizer step (``trainer.global_step`` advancing: gradient accumulation and several
optimizers count steps, not micro-batches), in ``on_train_batch_end``::

    first step:   ema = w                              (or at the first step at or after ema_start)
    later steps:  ema = s * ema + (1 - s) * w,         s = 2 ** (-(update_interval / half_life))

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
always hold the training weights, and the callback's state (the average and its counters) rides in
them, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly. Training ends on the training weights:
export the average with :meth:`EMACallback.save_ema_weights` or use :attr:`EMACallback.ema_model`.

Example::

    from lightning.pytorch import Trainer
    from emakit.integrations.lightning import EMACallback

    ema = EMACallback(half_life="100ba")
    Trainer(max_epochs=10, callbacks=[ema]).fit(module, train_loader, val_loader)  # validates with the average
    ema.save_ema_weights("ema.safetensors")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from emakit.deprecated import RenamedKeyword
from emakit.ema import EMA
from emakit.eval_weights import check_eval_weights
from emakit.integrations.lightning_sharded import load_shards, place_shards
from emakit.time import TimeUnit

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
        evaluate_with_ema: deprecated: ``eval_weights="ema"`` (True) or ``"training"`` (False).

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
        self._last_step = 0  # trainer.global_step of the running fit at the last update (or at its start)
        self._restored_step: int | None = None  # last_step of a checkpoint loaded into the running fit

    @property
    def state_key(self) -> str:
        half_life = self.ema.half_life
        of_run = half_life is not None and half_life.unit is TimeUnit.DURATION  # its smoothing comes at fit start
        rate = str(half_life) if of_run else self.ema.smoothing
        return self._generate_state_key(smoothing=rate, update_interval=str(self.ema.update_interval))

    @property
    def ema_model(self) -> nn.Module:
        """A module of the LightningModule's type holding the average (see :attr:`emakit.EMA.ema_model`)."""
        return self.ema.ema_model

    def save_ema_weights(self, path: str | Path) -> Path:
        """Write the average as safetensors, keyed like the module's ``state_dict`` (rank 0 writes)."""
        return self.ema.save_ema_weights(path)

    # ------------------------------------------------------------- training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a checkpoint loaded into an earlier ``fit``/``validate``: this run restores its own, if any."""
        self._restored_step = None

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
        restored, self._restored_step = self._restored_step, None
        if restored is not None and restored < step:
            # the checkpoint was written after optimizer step `step` but before this callback averaged it
            # (by a callback listed ahead of this one): the module holds that step's weights, average them now
            self.ema.update(pl_module, epoch=trainer.current_epoch)
        self._last_step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the average once per optimizer step (when ``trainer.global_step`` advanced in this batch)."""
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            self.ema.update(pl_module, epoch=trainer.current_epoch)  # the epoch, for ema_start in 'ep'

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
        """A checkpoint written while the average is swapped in (from inside evaluation) gets the training weights;
        sharded averages (FSDP2 under ``ModelParallelStrategy``, ZeRO-3 under ``DeepSpeedStrategy``) are saved so that
        every rank's part resumes (:mod:`emakit.integrations.lightning_sharded`)."""
        if self.ema.swapped:
            self.ema.get_training_model(pl_module)
            try:
                weights = trainer.strategy.lightning_module_state_dict()  # as the strategy saves them (collective)
                checkpoint["state_dict"] = {k: v.detach().clone() for k, v in weights.items()}
            finally:
                self.ema.get_ema_model(pl_module)
        place_shards(trainer, checkpoint, self.state_key, self.ema)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Read the average's shards saved beside the model's in a checkpoint folder, before the state is loaded."""

        def laid_out_state() -> dict[str, Any]:
            self.ema.attach(pl_module)  # the sharded module (a validate or test run has not attached it yet)
            return self.state_dict()

        load_shards(trainer, checkpoint, self.state_key, laid_out_state)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.checkpoint_state(), "last_step": self._last_step}  # shard_over_ranks: every rank's

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"ema", "last_step"} - set(state_dict)
        if missing:
            raise ValueError(f"EMACallback state lacks {sorted(missing)}; got the keys {sorted(state_dict)}")
        self.ema.load_state_dict(state_dict["ema"])
        self._last_step = self._restored_step = int(state_dict["last_step"])
