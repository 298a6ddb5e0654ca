"""EMA of the weights for the Hugging Face ``transformers.Trainer`` (``pip install emakit[transformers]``).

The average follows the EMA recurrence once per optimizer step (after gradient accumulation)::

    first step:  ema = w                                       (the average starts at the weights)
    later steps: ema = s * ema + (1 - s) * w,   s = 2 ** (-1 / half_life_in_steps)  (or ``smoothing=s``)

``EMA(ema_start=...)`` may be in optimizer steps, epochs (``"1ep"``: the first optimizer step of the
second epoch) or a fraction of ``max_steps`` (``"0.3dur"``).

Two pieces:

- :class:`EMATrainerCallback` (:mod:`~emakit.integrations.transformers_callback`) updates the average in
  ``on_step_end`` and writes its state into every checkpoint folder in ``on_save`` (``emakit_ema.pt``, or under
  DeepSpeed ZeRO-3 one ``emakit_ema-rank{r}.pt`` per process: :mod:`~emakit.integrations.state_files`). Alone,
  with a plain ``Trainer``, it keeps the average and checkpoints it; evaluation still sees the training weights.
- :class:`EMATrainerMixin` / :class:`EMATrainer` add what no callback can do, because the
  ``Trainer`` has no event before an evaluation nor on resume: every ``evaluate()`` (each dataset
  of a dict, ``eval_on_start``, the training loop's evaluations, your own calls) and every ``predict()`` runs
  with the average swapped in (``eval_weights="both"`` measures the training weights too, in the same evaluation:
  one log entry and one ``on_evaluate``, holding ``eval_loss`` and ``eval_training_loss``), checkpoints
  keep the training weights, ``train(resume_from_checkpoint=...)`` restores the average exactly, and
  :meth:`EMATrainerMixin.save_ema_model` writes a ``from_pretrained`` folder of the averaged weights.

With ``TrainingArguments(deepspeed=config)`` the average lives where DeepSpeed keeps the weights: whole on every
process under ZeRO-1/2, each process's partitions (of the fp32 masters) under ZeRO-3, updated with no
communication; evaluations and predictions swap each process's partitions in (ZeRO-3's forward gathers them) and
``save_ema_model`` gathers the average to the main process (``docs/integrations/transformers.md``).

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
dataset of a dict and, like ``predict()``, measures through ``evaluation_loop(dataloader, description,
prediction_loss_only, ignore_keys, metric_key_prefix)`` (no legacy ``prediction_loop`` any more); ``on_step_end``
comes with ``state.epoch = epoch + (step + 1) / steps_in_epoch``; ``Trainer._load_best_model`` loads
``load_best_model_at_end``'s checkpoint; ``Trainer._save(output_dir, state_dict=...)`` writes a given state from
the main process (what ``save_model`` calls with ZeRO-3's gathered weights).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

try:
    from transformers import Trainer
    from transformers.trainer_utils import EvalLoopOutput, PredictionOutput, get_last_checkpoint
except ImportError as error:  # pragma: no cover - only without the extra
    raise ImportError(
        "emakit.integrations.transformers needs transformers: pip install 'emakit[transformers]'"
    ) from error

from emakit.deprecated import RenamedKeyword
from emakit.ema import EMA
from emakit.eval_weights import EVAL_WEIGHTS, TRAINING, check_eval_weights
from emakit.integrations import state_files
from emakit.integrations.state_files import EMA_STATE_NAME
from emakit.integrations.transformers_callback import EMATrainerCallback, check_ema
from emakit.storage import sharded

__all__ = ["EMA_STATE_NAME", "EMATrainer", "EMATrainerCallback", "EMATrainerMixin", "gathered_average"]

EMA_EVAL = RenamedKeyword(
    "EMATrainer", "ema_eval", "eval_weights", {value: value for value in EVAL_WEIGHTS}, default="ema"
)


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

    :meth:`predict` follows ``eval_weights`` too: ``"ema"`` the average's predictions (the training weights' before
    the average starts), ``"training"`` the training weights', ``"both"`` the average's predictions with both sets
    of metrics (``test_loss`` and ``test_training_loss``). The average is swapped in only inside ``evaluate`` and
    ``predict``; checkpoints' model weights are always the training weights. ``train(resume_from_checkpoint=...)``
    restores the average from the checkpoint, and ``load_best_model_at_end`` loads the best checkpoint's average
    with its weights.

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
        self.ema = check_ema(ema)
        self.eval_weights = eval_weights
        self.ema_callback = EMATrainerCallback(ema)
        self._ema_measure_training = False  # set by evaluate with eval_weights="both", taken up by evaluation_loop
        super().__init__(*args, **kwargs)
        self.add_callback(self.ema_callback)

    def _trained_model(self) -> nn.Module:
        """``self.model``, which ``Trainer.__init__`` sets (typed optional: a ``model_init`` makes it there too)."""
        assert self.model is not None
        return self.model

    @contextlib.contextmanager
    def _measuring_by_eval_weights(self) -> Iterator[None]:
        """Inside the block the model holds what ``eval_weights`` measures; :meth:`evaluate` and :meth:`predict` run
        in it.

        The average is swapped in (``ema.ema_weights``) when ``eval_weights`` is ``"ema"`` or ``"both"`` and the
        average has started; with ``"both"`` the block's :meth:`evaluation_loop` also measures the training weights.
        The training weights are back on exit, also when the block raises. Inside ``ema_weights(...)`` of the
        caller's own (the average already swapped in) it measures what the model holds.
        """
        if self.eval_weights == TRAINING or not self.ema.started or self.ema.swapped:
            yield
            return
        self._ema_measure_training = self.eval_weights == "both"  # taken up by the block's evaluation_loop
        try:
            with self.ema.ema_weights(self._trained_model()):
                yield
        finally:
            self._ema_measure_training = False

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
        if isinstance(dataset, dict):  # Trainer.evaluate calls evaluate once per dataset: each lands below
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        with self._measuring_by_eval_weights():
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test", **kwargs: Any
    ) -> PredictionOutput:
        """``Trainer.predict`` on the weights ``eval_weights`` names, as :meth:`evaluate` measures them.

        ``"ema"``: the average's predictions and metrics (``test_*``), the training weights' before the average
        has started; ``"training"``: the training weights'. ``"both"``: the predictions and label ids are the
        average's, the metrics hold the average's (``{prefix}_*``) and the training weights' (``{prefix}_training_*``)
        together, in one ``on_predict`` (``{prefix}_runtime`` and the throughputs cover both passes). The model
        holds its training weights again on return, also when ``predict`` raises.
        """
        with self._measuring_by_eval_weights():
            return super().predict(test_dataset, ignore_keys, metric_key_prefix, **kwargs)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **kwargs: Any,
    ) -> EvalLoopOutput:
        """``Trainer.evaluation_loop``; inside :meth:`evaluate` or :meth:`predict` with ``eval_weights="both"`` it loops
        twice.

        First over the model as :meth:`evaluate` left it (the average swapped in), then, with the
        training weights put back for the second loop only, under ``metric_key_prefix + "_training"``;
        the second loop's metrics join the first's in the returned output, predictions and labels are the
        average's. Other calls loop once, over what the model holds.
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
        self._ema_measure_training = False  # once per evaluate or predict
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
            self.ema_callback.load_state(resume_from_checkpoint, rank=self.args.process_index)  # every process
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best is not None and state_files.has_state(best, self.args.process_index):
            self.ema_callback.load_state(best, rank=self.args.process_index)

    def save_ema_model(self, output_dir: str | os.PathLike) -> None:
        """Write the averaged model to ``output_dir``, loadable with ``from_pretrained``. Call it on every process.

        A model whose weights are whole on every process (one process, DDP, DeepSpeed ZeRO-1/2): the average is
        swapped in, ``save_model`` (``save_pretrained``, plus the tokenizer or processor) writes it from the main
        process, and the training weights come back bit for bit. A sharded model (DeepSpeed ZeRO-3 partitions,
        FSDP2 shards): each tensor of the average is gathered to the main process, one at a time, in the model's
        dtype (tensors the EMA does not track: the training weights, gathered the same way), and written by
        ``save_pretrained(output_dir, state_dict=...)``, as ``save_model`` writes a ZeRO-3 model's gathered
        16-bit weights (without needing ``stage3_gather_16bit_weights_on_model_save``).
        """
        if not self.ema.started:
            raise RuntimeError(
                "the EMA has not started (no optimizer step reached ema_start yet): there is no averaged model to save"
            )
        model, output_dir = self._trained_model(), os.fspath(output_dir)
        if not any(sharded.is_sharded(p) for p in model.parameters()):
            with self.ema.ema_weights(model):
                self.save_model(output_dir, _internal_call=True)
            return
        state = gathered_average(self.ema, model)  # collective: every process, in one order
        if self.args.should_save:
            self._save(output_dir, state_dict=state)


def _random_state_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Restore torch's random state on leaving (the CPU's, and ``device``'s when it is an accelerator).

    Every pass over a ``DataLoader`` draws its base seed from torch's global generator: the second loop of
    ``eval_weights="both"`` would shift every later random number (dropout masks, shuffles), and training would
    no longer follow a plain ``Trainer``'s bit for bit.
    """
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def gathered_average(ema: EMA, model: nn.Module) -> dict[str, Any]:
    """The average of a sharded ``model`` as a whole ``state_dict`` in the model's dtypes, on the processes that
    receive it (rank 0 for ZeRO-3, every rank for FSDP2; an empty dict elsewhere): each tensor gathered through
    :func:`emakit.storage.sharded.gathered`, one at a time, tensors the EMA does not track taken from the model.
    Collective: every process calls.

    Example (every process of a ZeRO-3 run; ``model`` is ``trainer.model``)::

        >>> state = gathered_average(ema, model)  # doctest: +SKIP
        >>> plain.load_state_dict(state) if dist.get_rank() == 0 else None  # doctest: +SKIP
    """
    own = model.state_dict(keep_vars=True)  # ZeRO-3 placeholders, DTensors: nothing is gathered here
    average = ema.ema_state_dict()  # tracked tensors, keyed like own
    tracked = ema.shadow.state_dict_keys  # the same keys on every process (average is empty off rank 0 under ZeRO-3)
    state: dict[str, Any] = {}
    for name, tensor in own.items():
        value = average.get(name) if name in tracked else sharded.gathered(tensor, sharded.local(tensor).detach())
        if value is not None:
            state[name] = value.to(tensor.dtype)
    return state if len(state) == len(own) else {}


class EMATrainer(EMATrainerMixin, Trainer):
    """A ``transformers.Trainer`` with an EMA of the weights: ``EMATrainer(..., ema=EMA(...), eval_weights="ema")``.

    See :class:`EMATrainerMixin` for what it does and the module docstring for a runnable example.
    """
