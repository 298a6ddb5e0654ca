"""The Hugging Face ``TrainerCallback`` that keeps an :class:`~emakit.EMA` and writes it into every checkpoint.

Part of :mod:`emakit.integrations.transformers` (import it from there): :class:`EMATrainerCallback` updates the
average once per optimizer step and saves its state into ``checkpoint-N/`` (:mod:`emakit.integrations.state_files`:
one file from the main process, or one per rank where each rank holds its own partitions, DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - only without the extra
    raise ImportError(
        "emakit.integrations.transformers needs transformers: pip install 'emakit[transformers]'"
    ) from error

from emakit.ema import EMA
from emakit.integrations import state_files
from emakit.tracked import unwrap

__all__ = ["EMATrainerCallback", "check_ema", "step_epoch"]


def step_epoch(epoch: float | None) -> int | None:
    """The epoch (from 0) of the optimizer step that ``on_step_end`` reports, from ``state.epoch``.

    The ``Trainer`` sets ``state.epoch = epoch + (step + 1) / steps_in_epoch`` before ``on_step_end``: a
    fraction in ``(epoch, epoch + 1]``, reaching ``epoch + 1`` at the epoch's last step, which still belongs
    to ``epoch`` (``int(state.epoch)`` would be one too many there).

    Example::

        >>> step_epoch(1.0), step_epoch(1.25)
        (0, 1)
    """
    if epoch is None:
        return None
    if epoch < 0 or not math.isfinite(epoch):
        raise ValueError(f"state.epoch={epoch!r} must be a finite number >= 0")
    return max(math.ceil(epoch) - 1, 0)


def check_ema(ema: Any) -> EMA:
    """``ema`` if it is an :class:`~emakit.EMA`; else a TypeError naming what it is."""
    if not isinstance(ema, EMA):
        raise TypeError(f"ema must be an emakit.EMA, e.g. EMA(half_life='100ba'); got {type(ema).__name__}: {ema!r}")
    return ema


class EMATrainerCallback(TrainerCallback):
    """Keeps an :class:`~emakit.EMA` of a ``transformers.Trainer``'s model and checkpoints it.

    ``on_step_end`` (once per optimizer step, after gradient accumulation) calls
    ``ema.update(model, epoch=...)``: ``ema = w`` at the first step, then ``ema = s * ema + (1 - s) * w``.
    The epoch (from 0) is the one the step belongs to, so ``ema_start="1ep"`` starts the average at the
    first optimizer step of the second epoch; ``ema_start`` in ``dur`` is a fraction of ``max_steps``.
    ``on_save`` writes ``ema.state_dict()`` into the checkpoint folder: ``emakit_ema.pt`` from the main process
    when every process holds the same average (one process, DDP, DeepSpeed ZeRO-1/2), ``emakit_ema-rank{r}.pt``
    from every process when each holds its own partitions (DeepSpeed ZeRO-3) or shards (FSDP2). With a plain
    ``Trainer`` restore it on resume yourself, before ``train``::

        callback = EMATrainerCallback(EMA(half_life="100ba"))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        callback.load_state("out/checkpoint-100")         # only when resuming; every process
        trainer.train(resume_from_checkpoint="out/checkpoint-100")
        with callback.ema.ema_weights(trainer.model):    # evaluate the average
            trainer.evaluate()

    :class:`~emakit.integrations.transformers.EMATrainer` does all of this (and swaps the average in for every
    evaluation) itself.
    """

    def __init__(self, ema: EMA) -> None:
        self.ema = check_ema(ema)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0:  # optimizer steps of the whole run
            self.ema.set_run_length(state.max_steps)  # 'dur' half-lives get their smoothing; too long ones, a warning

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Update the average with the weights after this optimizer step."""
        if model is None:
            raise RuntimeError("EMATrainerCallback.on_step_end got no model: add it to a transformers.Trainer")
        self.ema.update(unwrap(model), epoch=step_epoch(state.epoch))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not (args.should_save or state_files.per_rank(self.ema)):  # a whole average: the main process writes it
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a hyperparameter search writes into run-*/ folders, not output_dir itself
            warnings.warn(
                f"EMATrainerCallback: checkpoint folder {str(folder)!r} does not exist; the EMA state was not saved",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.save_state(folder, rank=args.process_index, main=args.should_save)

    def save_state(
        self, checkpoint_dir: str | os.PathLike, rank: int | None = None, main: bool | None = None
    ) -> Path | None:
        """Write ``ema.state_dict()`` into ``checkpoint_dir`` and return the path written (None where nothing is).

        ``emakit_ema.pt`` from the ``main`` process for an average every process holds whole;
        ``emakit_ema-rank{rank}.pt`` from every process for one whose processes hold their own partitions (call it
        on every rank then). ``rank`` defaults to this process's ``torch.distributed`` rank (0 without a process
        group), ``main`` to ``rank == 0``. Written through :func:`emakit.atomic.atomic_write`: a crash or an error
        midway leaves the old file (or none) and no partial one.
        """
        rank = state_files.current_rank() if rank is None else rank
        return state_files.save_state(self.ema, checkpoint_dir, rank, main=rank == 0 if main is None else main)

    def load_state(self, checkpoint_dir: str | os.PathLike, rank: int | None = None) -> None:
        """Restore the average from ``checkpoint_dir`` as :meth:`save_state` wrote it: this rank's own file where
        there is one, else ``emakit_ema.pt`` (``rank`` as in :meth:`save_state`). Call it on every process."""
        state_files.load_state(self.ema, checkpoint_dir, state_files.current_rank() if rank is None else rank)
