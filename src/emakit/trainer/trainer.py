"""A small event-driven trainer: it runs the loop and fires events; algorithms and callbacks do the rest.

The trainer knows nothing of EMA. An :class:`~emakit.EMA` in ``algorithms`` updates itself at
batch or epoch ends and swaps its weights in for evaluation through the events.

This module is the class: its arguments checked, then the run set up. Its parts, one seam each::

    arguments.py    each argument's check and default                     (check_max_duration, resolve_device, ...)
    loop.py         fit, epochs, batches, the events they fire           (TrainerLoop)
    evaluation.py   eval, of the weights eval_weights names               (TrainerEvaluation)
    resume.py       state_dict, load_state_dict, save_checkpoint, resume  (TrainerResume)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit import distributed
from emakit.core import Algorithm, Callback, Engine, Event, State
from emakit.core.algorithm import ProvidesAlgorithm
from emakit.deprecated import RenamedKeyword
from emakit.eval_weights import check_eval_weights
from emakit.loggers import Logger, LoggerDestination
from emakit.time import Time, Timestamp
from emakit.tracked import unwrap
from emakit.trainer.arguments import (
    batches_per_epoch,
    check_autoresume,
    check_checkpoints_to_keep,
    check_interval,
    check_max_duration,
    check_model,
    check_precision,
    check_seed,
    check_train_dataloader,
    listed,
    resolve_device,
    resolve_seed,
)
from emakit.trainer.evaluation import TrainerEvaluation
from emakit.trainer.loop import SEED_STRIDE, TrainerLoop
from emakit.trainer.resume import TrainerResume
from emakit.trainer.rng import seed_everything

__all__ = ["Trainer"]


EVALUATE_ALL_WEIGHTS = RenamedKeyword(
    "Trainer", "evaluate_all_weights", "eval_weights", {True: "both", False: "ema"}, default="ema", unmatched=False
)


class Trainer(TrainerLoop, TrainerEvaluation, TrainerResume):
    """Trains ``model`` on ``train_dataloader`` for ``max_duration``, firing events for algorithms and callbacks.

    Args:
        model: an ``nn.Module`` with ``loss(outputs, batch)`` (and optionally ``metrics``), such
            as :class:`~emakit.Classifier`; ``model(batch)`` gives the outputs.
        train_dataloader: an iterable of batches, usually a ``DataLoader``.
        max_duration: when to stop: ``"10ep"``, ``"500ba"``, ``"1e5sp"``, ``"1e6tok"``, or an int of epochs.
        eval_dataloader: batches for :meth:`eval`, run every ``eval_interval`` and at the end.
        optimizers: one optimizer or a list (default: SGD with lr 0.1), stepped every batch.
        schedulers: LR schedulers, stepped after every optimizer step.
        algorithms, callbacks, loggers: see :class:`~emakit.Algorithm` (or objects with ``as_algorithm()``: an
            :class:`~emakit.EMA`), :class:`~emakit.Callback`, :mod:`emakit.loggers`. At each event algorithms run
            first, then callbacks.
        eval_interval: ``"1ep"``, ``"100ba"``, or an int of epochs.
        device: default CUDA when available, else CPU.
        precision: ``"fp32"``, ``"amp_bf16"`` (autocast to bfloat16 for forward and loss) or ``"amp_fp16"``
            (autocast to float16, with a ``torch.amp.GradScaler`` scaling the loss; its state is checkpointed).
        seed: seeds Python, NumPy and torch, and the shuffling order of each epoch.
        save_folder, save_interval: write a checkpoint every ``save_interval`` (``"1ep"``, ``"5ba"``).
        save_num_checkpoints_to_keep: delete all but the newest N checkpoints (-1: keep all).
        load_path: a checkpoint to resume from.
        autoresume: resume from the newest checkpoint in ``save_folder`` when there is one.
        progress_bar: a tqdm bar while training, shown only on a terminal (and only by rank 0).
        parallelism: with several processes (``torchrun``): ``"ddp"`` (DistributedDataParallel), ``"fsdp"``
            (FSDP2 ``fully_shard``, in place), or ``None``: DDP, or the model as it is when you wrapped it
            yourself. No effect in one process. See :mod:`emakit.distributed`.
        eval_weights: what every evaluation measures (:mod:`emakit.eval_weights`): ``"ema"`` (default) the
            weights the algorithms swap in for it (an EMA's average once it started; without one, the training
            weights); ``"training"`` the training weights; ``"both"`` the former under the usual names
            (``loss``, ``accuracy``) and the training weights as ``loss/training``, ``accuracy/training``, ...,
            with each other set of weights the algorithms offer (every EMA's average: ``loss/ema@50ba``), all in
            one ``state.eval_history`` entry and log record. Training is the same whatever it measures.
        evaluate_all_weights: deprecated: ``eval_weights="both"`` (True) or ``"ema"`` (False).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer starts the process group (``gloo`` on CPU, ``nccl`` on
    CUDA, one GPU per process: ``cuda:LOCAL_RANK``), gives each rank its share of a ``DataLoader`` with a default
    sampler, sums eval metrics over all ranks (each eval sample counted once), counts samples and tokens over all
    ranks, and lets only rank 0 show progress, log (other ranks' loggers get no records) and write checkpoints.
    ``state.model`` stays the model passed in; ``fit``, ``eval`` and ``save_checkpoint`` are collective: call
    them on every rank.

    Example::

        trainer = Trainer(model=Classifier(net), train_dataloader=train, eval_dataloader=test,
                          max_duration="5ep", algorithms=[EMA(half_life="50ba")])
        trainer.fit()
        print(trainer.eval())        # metrics of the EMA weights

    With ``eval_weights="both"`` the training weights too, in the same evaluation::

        trainer = Trainer(..., algorithms=[EMA(half_life="50ba")], eval_weights="both")
        trainer.fit()
        trainer.state.eval_history[-1]   # {"batch": ..., "epoch": ..., "loss": ..., "loss/training": ...,
                                         #  "loss/ema@50ba": ..., "accuracy": ..., ...}
    """

    evaluate_all_weights = EVALUATE_ALL_WEIGHTS.attribute()

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: Iterable,
        max_duration: str | int | Time,
        eval_dataloader: Iterable | None = None,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any | Sequence[Any] | None = None,
        algorithms: Sequence[Algorithm | ProvidesAlgorithm] = (),
        callbacks: Sequence[Callback] = (),
        loggers: Sequence[LoggerDestination] = (),
        eval_interval: str | int | Time = "1ep",
        device: str | torch.device | None = None,
        precision: str = "fp32",
        seed: int | None = None,
        save_folder: str | os.PathLike | None = None,
        save_interval: str | int | Time = "1ep",
        save_num_checkpoints_to_keep: int = -1,
        load_path: str | os.PathLike | None = None,
        autoresume: bool = False,
        progress_bar: bool = True,
        parallelism: str | None = None,
        eval_weights: str = "ema",
        evaluate_all_weights: bool | None = None,
    ) -> None:
        check_model(model)
        check_train_dataloader(train_dataloader)
        duration = check_max_duration(max_duration)
        check_precision(precision)
        check_seed(seed)
        keep = check_checkpoints_to_keep(save_num_checkpoints_to_keep)
        eval_weights = check_eval_weights(EVALUATE_ALL_WEIGHTS.resolve(evaluate_all_weights, eval_weights))
        check_autoresume(autoresume, save_folder)
        distributed.check_parallelism(parallelism)
        kind = distributed.check_wrapping(model, parallelism)
        self._fsdp = kind == "fsdp" or (parallelism == "fsdp" and distributed.world_size() > 1)
        self.eval_interval = check_interval(eval_interval, "eval_interval")
        self.save_interval = check_interval(save_interval, "save_interval")
        Engine.check(algorithms, callbacks)
        timestamp = Timestamp()
        self.logger = Logger(loggers, timestamp)
        batches = batches_per_epoch(train_dataloader)
        device = resolve_device(device, self._fsdp)

        # Every argument is valid: from here on the trainer changes things.
        distributed.initialize(device)
        if not distributed.is_main():
            self.logger.destinations = []  # only rank 0 logs
        self.seed = resolve_seed(seed)
        seed_everything(self.seed)
        model.to(device)
        default_optimizer = optimizers is None
        optimizers = listed(optimizers, torch.optim.Optimizer)
        self.state = State(
            model=model,
            max_duration=duration,
            optimizers=list(optimizers),
            schedulers=listed(schedulers),
            batches_per_epoch=batches,
            device=device,
            precision=precision,
            timestamp=timestamp,
            parallelism=kind or (parallelism or "ddp" if distributed.world_size() > 1 else None),
        )
        self.engine = Engine(self.state, algorithms, callbacks, self.logger)
        self.engine.run_event(Event.INIT)  # before wrapping, as in Composer: algorithms see the plain model
        before = dict(unwrap(model).named_parameters())
        self._train_module = distributed.wrap_model(model, parallelism, device)
        if default_optimizer:
            self.state.optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
        elif self._fsdp and kind is None:
            distributed.repoint_optimizers(optimizers, before, model)
        self.train_dataloader = distributed.shard_train_loader(train_dataloader, self.seed * SEED_STRIDE)
        self.eval_dataloader = distributed.shard_eval_loader(eval_dataloader)
        if self.train_dataloader is not train_dataloader:
            self.state.batches_per_epoch = len(self.train_dataloader)  # type: ignore[arg-type]
        self.save_folder = Path(save_folder) if save_folder is not None else None
        self.save_num_checkpoints_to_keep = keep
        self.load_path = Path(load_path) if load_path is not None else None
        self.autoresume = autoresume
        self.progress_bar = progress_bar
        self.eval_weights = eval_weights
        self._scaler = torch.amp.GradScaler(device.type) if precision == "amp_fp16" else None
        self._user_sampler = getattr(train_dataloader, "sampler", None)
        self._epoch_rng: torch.Tensor | None = None
        self._resume_rng: dict[str, Any] | None = None
