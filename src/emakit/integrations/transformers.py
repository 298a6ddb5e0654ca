"""EMA of the weights for the Hugging Face ``transformers.Trainer`` (``pip install emakit[transformers]``).

The average follows the EMA recurrence once per optimizer step (after gradient accumulation)::

    first step:  ema = w                                       (the average starts at the weights)
    later steps: ema = s * ema + (1 - s) * w,   s = 2 ** (-1 / half_life_in_steps)  (or ``smoothing=s``)

``EMA(ema_start=...)`` may be in optimizer steps, epochs (``"1ep"``: the first optimizer step of the
second epoch) or a fraction of ``max_steps`` (``"0.3dur"``).

Two pieces:

- :class:`EMATrainerCallback` updates the average in ``on_step_end`` and writes its state
  (``emakit_ema.pt``) into every checkpoint folder in ``on_save``. Alone, with a plain ``Trainer``,
  it keeps the average and checkpoints it; evaluation still sees the training weights.
- :class:`EMATrainerMixin` / :class:`EMATrainer` add what no callback can do, because the
  ``Trainer`` has no event before an evaluation nor on resume: every ``evaluate()`` (each dataset
  of a dict, ``eval_on_start``, the training loop's evaluations, your own calls) runs with the
  average swapped in (``eval_weights="both"`` measures the training weights too, in the same evaluation:
  one log entry and one ``on_evaluate``, holding ``eval_loss`` and ``eval_training_loss``), checkpoints
  keep the training weights, ``train(resume_from_checkpoint=...)`` restores the average exactly, and
  :meth:`EMATrainerMixin.save_ema_model` writes a ``from_pretrained`` folder of the averaged weights.

Example (runs on a CPU in seconds)::

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    from emakit import EMA
    from emakit.integrations.transformers import EMATrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (64, 8))]
    args = TrainingArguments("out", max_steps=20, per_device_train_batch_size=8, eval_strategy="steps",
                             eval_steps=10, save_steps=10, report_to=[], use_cpu=True)
    trainer = EMATrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                         ema=EMA(half_life="10ba"), eval_weights="both")
    trainer.train()                       # eval_loss: the average's; eval_training_loss: the weights'
    trainer.save_ema_model("out/ema")     # GPT2LMHeadModel.from_pretrained("out/ema") holds the average

Relies on these ``transformers`` internals (checked against 5.24): checkpoints are written to
``{output_dir}/checkpoint-{global_step}`` before ``on_save`` fires; the training loop evaluates
through the public ``evaluate()`` (``Trainer._evaluate`` calls it), which calls itself once per
dataset of a dict and measures through ``evaluation_loop(dataloader, description, prediction_loss_only,
ignore_keys, metric_key_prefix)`` (no legacy ``prediction_loop`` any more); ``on_step_end`` comes with
``state.epoch = epoch + (step + 1) / steps_in_epoch``; ``Trainer._load_best_model`` loads
``load_best_model_at_end``'s checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, get_last_checkpoint
except ImportError as error:  # pragma: no cover - only without the extra
    raise ImportError(
        "emakit.integrations.transformers needs transformers: pip install 'emakit[transformers]'"
    ) from error

from emakit.atomic import atomic_write
from emakit.deprecated import RenamedKeyword
from emakit.ema import EMA
from emakit.eval_weights import EVAL_WEIGHTS, TRAINING, check_eval_weights
from emakit.tracked import unwrap

__all__ = ["EMA_STATE_NAME", "EMATrainer", "EMATrainerCallback", "EMATrainerMixin"]

EMA_STATE_NAME = "emakit_ema.pt"
"""The file, inside each ``checkpoint-N`` folder, holding ``EMA.state_dict()``."""

EMA_EVAL = RenamedKeyword(
    "EMATrainer", "ema_eval", "eval_weights", {value: value for value in EVAL_WEIGHTS}, default="ema"
)


def _step_epoch(epoch: float | None) -> int | None:
    """The epoch (from 0) of the optimizer step that ``on_step_end`` reports, from ``state.epoch``.

    The ``Trainer`` sets ``state.epoch = epoch + (step + 1) / steps_in_epoch`` before ``on_step_end``: a
    fraction in ``(epoch, epoch + 1]``, reaching ``epoch + 1`` at the epoch's last step, which still belongs
    to ``epoch`` (``int(state.epoch)`` would be one too many there).
    """
    if epoch is None:
        return None
    if epoch < 0 or not math.isfinite(epoch):
        raise ValueError(f"state.epoch={epoch!r} must be a finite number >= 0")
    return max(math.ceil(epoch) - 1, 0)


def _check_ema(ema: Any) -> EMA:
    if not isinstance(ema, EMA):
        raise TypeError(f"ema must be an emakit.EMA, e.g. EMA(half_life='100ba'); got {type(ema).__name__}: {ema!r}")
    return ema


class EMATrainerCallback(TrainerCallback):
    """Keeps an :class:`~emakit.EMA` of a ``transformers.Trainer``'s model and checkpoints it.

    ``on_step_end`` (once per optimizer step, after gradient accumulation) calls
    ``ema.update(model, epoch=...)``: ``ema = w`` at the first step, then ``ema = s * ema + (1 - s) * w``.
    The epoch (from 0) is the one the step belongs to, so ``ema_start="1ep"`` starts the average at the
    first optimizer step of the second epoch; ``ema_start`` in ``dur`` is a fraction of ``max_steps``.
    ``on_save`` writes ``ema.state_dict()`` to ``checkpoint-N/emakit_ema.pt`` (main process
    only). With a plain ``Trainer`` restore it on resume yourself, before ``train``::

        callback = EMATrainerCallback(EMA(half_life="100ba"))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        callback.load_state("out/checkpoint-100")         # only when resuming
        trainer.train(resume_from_checkpoint="out/checkpoint-100")
        with callback.ema.ema_weights(trainer.model):    # evaluate the average
            trainer.evaluate()

    :class:`EMATrainer` does all of this (and swaps the average in for every evaluation) itself.
    """

    def __init__(self, ema: EMA) -> None:
        self.ema = _check_ema(ema)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0:  # optimizer steps of the whole run
            self.ema.set_run_length(state.max_steps)  # 'dur' half-lives get their smoothing; too long ones, a warning

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Update the average with the weights after this optimizer step."""
        if model is None:
            raise RuntimeError("EMATrainerCallback.on_step_end got no model: add it to a transformers.Trainer")
        self.ema.update(unwrap(model), epoch=_step_epoch(state.epoch))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:  # the main process writes; the average is the same on every process
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a hyperparameter search writes into run-*/ folders, not output_dir itself
            warnings.warn(
                f"EMATrainerCallback: checkpoint folder {str(folder)!r} does not exist; the EMA state was not saved",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.save_state(folder)

    def save_state(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write ``ema.state_dict()`` to ``checkpoint_dir/emakit_ema.pt`` and return the path.

        Written through :func:`emakit.atomic.atomic_write`: a crash or an error midway leaves the old file
        (or none) and no partial one.
        """
        path = Path(checkpoint_dir) / EMA_STATE_NAME
        with atomic_write(path) as file:
            torch.save(self.ema.state_dict(), file)
        return path

    def load_state(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the average from ``checkpoint_dir/emakit_ema.pt``, as :meth:`on_save` wrote it."""
        path = Path(checkpoint_dir) / EMA_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {str(checkpoint_dir)!r} holds no {EMA_STATE_NAME}: it was not written with an "
                "EMATrainerCallback, so the average cannot be resumed exactly"
            )
        self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _random_state_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Restore torch's random state on leaving (the CPU's, and ``device``'s when it is an accelerator).

    Every pass over a ``DataLoader`` draws its base seed from torch's global generator: the second loop of
    ``eval_weights="both"`` would shift every later random number (dropout masks, shuffles), and training would
    no longer follow a plain ``Trainer``'s bit for bit.
    """
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


if TYPE_CHECKING:  # a mixin of Trainer subclasses: type checkers see the Trainer it is mixed into
    _MixedIntoTrainer = Trainer
else:
    _MixedIntoTrainer = object


class EMATrainerMixin(_MixedIntoTrainer):
    """Mix into a ``transformers.Trainer`` subclass (``Seq2SeqTrainer``, TRL's trainers...) to train with an EMA.

    Takes two keyword arguments besides the trainer's own:

    - ``ema``: the :class:`~emakit.EMA`, updated once per optimizer step by an
      :class:`EMATrainerCallback` (``ema = s * ema + (1 - s) * w``) and saved into every checkpoint.
    - ``eval_weights`` (:mod:`emakit.eval_weights`): what :meth:`evaluate` measures once the average has
      started: ``"ema"`` (default) the average, under the usual metric names; ``"training"`` the training
      weights, under the usual names; ``"both"`` the average under ``{prefix}_*`` and the training weights under
      ``{prefix}_training_*`` (``eval_loss`` and ``eval_training_loss``), measured by two passes
      of ``evaluation_loop`` within one evaluation: one log entry and one ``on_evaluate`` hold both,
      so ``metric_for_best_model``, ``EarlyStoppingCallback`` and the loggers see every metric at once
      (``eval_runtime`` and the throughputs cover both passes). ``ema_eval``, its old name, is deprecated.

    The average is swapped in only inside ``evaluate``; checkpoints' model weights are always the
    training weights. ``train(resume_from_checkpoint=...)`` restores the average from the
    checkpoint, and ``load_best_model_at_end`` loads the best checkpoint's average with its weights.
    ``predict`` uses the training weights; wrap it in ``with trainer.ema.ema_weights(trainer.model):``
    for the average's predictions.

    Example::

        class EMASeq2SeqTrainer(EMATrainerMixin, Seq2SeqTrainer):
            pass

        trainer = EMASeq2SeqTrainer(model=model, args=args, train_dataset=data, ema=EMA(half_life="500ba"))
    """

    ema_eval = EMA_EVAL.attribute()

    def __init__(
        self, *args: Any, ema: EMA, eval_weights: str = "ema", ema_eval: str | None = None, **kwargs: Any
    ) -> None:
        eval_weights = check_eval_weights(EMA_EVAL.resolve(ema_eval, eval_weights, owner=type(self).__name__))
        self.ema = _check_ema(ema)
        self.eval_weights = eval_weights
        self.ema_callback = EMATrainerCallback(ema)
        self._ema_measure_training = False  # set by evaluate with eval_weights="both", taken up by evaluation_loop
        super().__init__(*args, **kwargs)
        self.add_callback(self.ema_callback)

    def _trained_model(self) -> nn.Module:
        """``self.model``, which ``Trainer.__init__`` sets (typed optional: a ``model_init`` makes it there too)."""
        assert self.model is not None
        return self.model

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **kwargs: Any,
    ) -> dict[str, float]:
        """``Trainer.evaluate`` with the average swapped into the model (see ``eval_weights``).

        One call is one evaluation event: one ``log`` and one ``on_evaluate`` (per dataset of a dict), whose
        metrics with ``eval_weights="both"`` hold the average's (``{prefix}_*``) and the training weights'
        (``{prefix}_training_*``) together; :meth:`evaluation_loop` measures both.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if (
            isinstance(dataset, dict)  # Trainer.evaluate calls evaluate once per dataset: each lands below
            or self.eval_weights == "training"
            or not self.ema.started
            or self.ema.swapped  # called inside ema_weights(...): evaluate what the model holds
        ):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        self._ema_measure_training = self.eval_weights == "both"  # taken up by this evaluation's evaluation_loop
        try:
            with self.ema.ema_weights(self._trained_model()):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        finally:
            self._ema_measure_training = False

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **kwargs: Any,
    ) -> EvalLoopOutput:
        """``Trainer.evaluation_loop``; inside an :meth:`evaluate` with ``eval_weights="both"`` it loops twice.

        First over the model as :meth:`evaluate` left it (the average swapped in), then, with the
        training weights put back for the second loop only, under ``metric_key_prefix + "_training"``;
        the second loop's metrics join the first's in the returned output, predictions and labels are the
        average's. ``predict`` and other calls loop once, over what the model holds.
        """
        output = super().evaluation_loop(
            dataloader,
            description=description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
            **kwargs,
        )
        if not getattr(self, "_ema_measure_training", False):
            return output
        self._ema_measure_training = False  # once per evaluate
        training_prefix = f"{metric_key_prefix}_{TRAINING}"
        self.ema.get_training_model(self._trained_model())  # out of the average for this loop only
        try:
            with _random_state_kept(self.args.device):  # a plain Trainer's evaluation has no second loop
                training = super().evaluation_loop(
                    dataloader,
                    description=description,
                    prediction_loss_only=prediction_loss_only,
                    ignore_keys=ignore_keys,
                    metric_key_prefix=training_prefix,
                    **kwargs,
                )
        finally:
            self.ema.get_ema_model(self._trained_model())  # evaluate's ema_weights block swaps it out again on its exit
        preparation = f"{training_prefix}_model_preparation_time"  # the same number as the first loop's
        assert output.metrics is not None and training.metrics is not None  # evaluation_loop fills them
        metrics = {**output.metrics, **{k: v for k, v in training.metrics.items() if k != preparation}}
        return output._replace(metrics=metrics)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, restoring the average from the checkpoint when resuming."""
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir  # TrainingArguments sets it ("trainer_output" by default)
            last = get_last_checkpoint(output_dir) if output_dir is not None and os.path.isdir(output_dir) else None
            if last is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
            resume_from_checkpoint = last
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):  # not None or False
            self.ema_callback.load_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best is not None and (Path(best) / EMA_STATE_NAME).is_file():
            self.ema_callback.load_state(best)

    def save_ema_model(self, output_dir: str | os.PathLike) -> None:
        """Write the averaged model to ``output_dir``, loadable with ``from_pretrained``.

        The average is swapped in, ``save_model`` (``save_pretrained``, plus the tokenizer or
        processor) writes it from the main process, and the training weights come back bit for bit.
        """
        if not self.ema.started:
            raise RuntimeError(
                "the EMA has not started (no optimizer step reached ema_start yet): there is no averaged model to save"
            )
        with self.ema.ema_weights(self._trained_model()):
            self.save_model(os.fspath(output_dir), _internal_call=True)


class EMATrainer(EMATrainerMixin, Trainer):
    """A ``transformers.Trainer`` with an EMA of the weights: ``EMATrainer(..., ema=EMA(...), eval_weights="ema")``.

    See :class:`EMATrainerMixin` for what it does and the module docstring for a runnable example.
    """
