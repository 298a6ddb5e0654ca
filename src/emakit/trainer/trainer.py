"""A small event-driven trainer: it runs the loop and fires events; algorithms and callbacks do the rest.

The trainer knows nothing of EMA. An :class:`~emakit.EMA` in ``algorithms`` updates itself at
batch or epoch ends and swaps its weights in for evaluation through the events.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from emakit import distributed
from emakit.core import Algorithm, Callback, Engine, Event, State
from emakit.loggers import Logger, LoggerDestination
from emakit.time import Time, Timestamp, TimeUnit, as_interval, as_time
from emakit.tracked import describe_mismatch, unwrap
from emakit.trainer.batches import batch_size, to_device
from emakit.trainer.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    remove_partial_files,
    save_checkpoint,
)
from emakit.trainer.evaluation import fsdp_eval_forwards, sum_metrics
from emakit.trainer.rng import rng_state, seed_everything, set_rng_state
from emakit.trainer.sharded import load_sharded_checkpoint, save_sharded_checkpoint

__all__ = ["Trainer"]

_PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
_SEED_STRIDE = 1_000_003  # epoch e of a run seeded s shuffles with the permutation seeded s * _SEED_STRIDE + e


def _copy_state(state: Any) -> Any:
    """A copy of a nested state: tensors cloned (DTensors too: FSDP storages refuse deepcopy), the rest deep-copied."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copy_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(value) for value in state)
    return copy.deepcopy(state)


def _means(totals: dict[str, tuple[float, int]]) -> dict[str, float]:
    return {name: total / max(count, 1) for name, (total, count) in totals.items()}


def _ignore(*_: Any) -> None:
    """An evaluation batch's outputs, unused."""


class Trainer:
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
        evaluate_all_weights: every evaluation also measures the training weights (``loss/training``,
            ``accuracy/training``, ...) and each other set of weights the algorithms offer (every EMA's
            average: ``loss/ema@50ba``), all in the same ``state.eval_history`` entry and log record.
            The plain names stay the default evaluation's (the last EMA's average, as without it).

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
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: Iterable,
        max_duration: str | int | Time,
        eval_dataloader: Iterable | None = None,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any | Sequence[Any] | None = None,
        algorithms: Sequence[Algorithm] = (),
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
        evaluate_all_weights: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module) or not callable(getattr(unwrap(model), "loss", None)):
            raise ValueError(
                f"model must be an nn.Module with a loss(outputs, batch) method, got {type(model).__name__}; "
                "wrap a plain module as emakit.Classifier(module)"
            )
        if not isinstance(train_dataloader, Iterable):
            raise ValueError(f"train_dataloader must be iterable, got {type(train_dataloader).__name__}")
        duration = as_time(max_duration, name="max_duration", int_unit=TimeUnit.EPOCH)
        if duration.unit is TimeUnit.DURATION or duration.value <= 0:
            raise ValueError(f"max_duration={max_duration!r} must be > 0 in 'ba', 'ep', 'sp' or 'tok'")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported: use one of {_PRECISIONS}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        keep = save_num_checkpoints_to_keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep == 0 or keep < -1:
            raise ValueError(f"save_num_checkpoints_to_keep={keep!r} must be a positive int, or -1 to keep all")
        if not isinstance(evaluate_all_weights, bool):
            raise ValueError(f"evaluate_all_weights={evaluate_all_weights!r} must be True or False")
        if autoresume and save_folder is None:
            raise ValueError("autoresume=True needs a save_folder to look for checkpoints in")
        distributed.check_parallelism(parallelism)
        kind = distributed.check_wrapping(model, parallelism)
        self._fsdp = kind == "fsdp" or (parallelism == "fsdp" and distributed.world_size() > 1)
        self.eval_interval = as_interval(
            eval_interval, name="eval_interval", int_unit=TimeUnit.EPOCH, examples=("1ep", "100ba")
        )
        self.save_interval = as_interval(
            save_interval, name="save_interval", int_unit=TimeUnit.EPOCH, examples=("1ep", "100ba")
        )
        Engine.check(algorithms, callbacks)
        timestamp = Timestamp()
        self.logger = Logger(loggers, timestamp)
        try:
            batches_per_epoch = len(train_dataloader)  # type: ignore[arg-type]
        except TypeError:
            batches_per_epoch = None
        if batches_per_epoch == 0:
            raise ValueError("train_dataloader yields no batches")
        try:
            device = torch.device(device) if device is not None else distributed.default_device()
        except RuntimeError as error:
            raise ValueError(f"device={device!r} is not a torch device: {error}") from None
        if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
            device = torch.device("cuda", distributed.local_rank())
        if self._fsdp:
            distributed.check_fsdp_device(device)

        # Every argument is valid: from here on the trainer changes things.
        distributed.initialize(device)
        if not distributed.is_main():
            self.logger.destinations = []  # only rank 0 logs
        self.seed = distributed.from_rank0(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        seed_everything(self.seed)
        model.to(device)
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        if schedulers is None:
            schedulers = []
        elif not isinstance(schedulers, (list, tuple)):
            schedulers = [schedulers]
        self.state = State(
            model=model,
            max_duration=duration,
            optimizers=list(optimizers or []),
            schedulers=list(schedulers),
            batches_per_epoch=batches_per_epoch,
            device=device,
            precision=precision,
            timestamp=timestamp,
            parallelism=kind or (parallelism or "ddp" if distributed.world_size() > 1 else None),
        )
        self.engine = Engine(self.state, algorithms, callbacks, self.logger)
        self.engine.run_event(Event.INIT)  # before wrapping, as in Composer: algorithms see the plain model
        before = dict(unwrap(model).named_parameters())
        self._train_module = distributed.wrap_model(model, parallelism, device)
        if optimizers is None:
            self.state.optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
        elif self._fsdp and kind is None:
            distributed.repoint_optimizers(optimizers, before, model)
        self.train_dataloader = distributed.shard_train_loader(train_dataloader, self.seed * _SEED_STRIDE)
        self.eval_dataloader = distributed.shard_eval_loader(eval_dataloader)
        if self.train_dataloader is not train_dataloader:
            self.state.batches_per_epoch = len(self.train_dataloader)  # type: ignore[arg-type]
        self.save_folder = Path(save_folder) if save_folder is not None else None
        self.save_num_checkpoints_to_keep = keep
        self.load_path = Path(load_path) if load_path is not None else None
        self.autoresume = autoresume
        self.progress_bar = progress_bar
        self.evaluate_all_weights = evaluate_all_weights
        self._scaler = torch.amp.GradScaler(device.type) if precision == "amp_fp16" else None
        self._user_sampler = getattr(train_dataloader, "sampler", None)
        self._epoch_rng: torch.Tensor | None = None
        self._resume_rng: dict[str, Any] | None = None

    # ---------------------------------------------------------------- training
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
            sampler.generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + timestamp.epoch)
        elif isinstance(sampler, DistributedSampler):
            if sampler is not self._user_sampler:
                sampler.seed = self.seed * _SEED_STRIDE  # the trainer's own: follows a seed loaded from a checkpoint
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
            state.loss = module.loss(state.outputs, state.batch)
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

    # -------------------------------------------------------------- evaluation
    def _eval_if_possible(self) -> None:
        if self.eval_dataloader is not None:
            self.eval()

    def eval(self, dataloader: Iterable | None = None) -> dict[str, float]:
        """Metrics over ``dataloader`` (default: ``eval_dataloader``): loss and the model's metrics.

        With an EMA among the algorithms, these are the EMA weights' metrics; the training
        weights are back when this returns, also if evaluation raises.

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

            metrics = _means(sum_metrics(model, dataloader, state.device, self._autocast, after_batch, forwards))
            if self.evaluate_all_weights:
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

    def _eval_other_weights(self, dataloader: Iterable, forwards: int) -> dict[str, float]:
        """Metrics of the training weights and of the algorithms' other weights, as ``NAME/LABEL``."""
        state = self.state
        metrics: dict[str, float] = {}
        with contextlib.ExitStack() as stack:
            for algorithm in reversed(self.engine.algorithms):  # the model holds the training weights inside
                stack.enter_context(algorithm.training_weights(state))
            weights: dict[str, contextlib.AbstractContextManager] = {"training": contextlib.nullcontext()}
            for algorithm in self.engine.algorithms:
                for label, context in algorithm.evaluation_weights(state).items():
                    unique = label if label not in weights else f"{label}#{len(weights)}"
                    weights[unique] = context
            for label, context in weights.items():
                with context:
                    totals = sum_metrics(state.model, dataloader, state.device, self._autocast, _ignore, forwards)
                metrics.update({f"{name}/{label}": value for name, value in _means(totals).items()})
        return metrics

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (training weights, never swapped-in EMA weights).

        The model's tensors are named as in the plain model's ``state_dict`` (no DDP ``module.`` prefix).
        """
        state = self.state
        with contextlib.ExitStack() as stack:
            for algorithm in reversed(self.engine.algorithms):  # the last swapped in comes out first
                stack.enter_context(algorithm.training_weights(state))
            model = {name: tensor.clone() for name, tensor in unwrap(state.model).state_dict().items()}
        return {
            "model": model,
            "optimizers": [self._optimizer_state(o) for o in state.optimizers],
            "schedulers": [s.state_dict() for s in state.schedulers],
            "algorithms": [a.state_dict() for a in self.engine.algorithms],
            "callbacks": [c.state_dict() for c in self.engine.callbacks],
            "timestamp": state.timestamp.state_dict(),
            "eval_history": list(state.eval_history),
            "seed": self.seed,
            "rng": rng_state(),
            "epoch_rng": self._epoch_rng,
            "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()``; under FSDP keyed by parameter name, with DTensor shards (and never empty)."""
        if not self._fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(self.state.model), optimizer)

    def _load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        if not self._fsdp:
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(self.state.model), optimizer, optim_state_dict=saved)

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (as :meth:`state_dict` gives it); checks everything before changing anything."""
        state = self.state
        missing = {"model", "optimizers", "schedulers", "algorithms", "callbacks", "timestamp", "rng"} - set(checkpoint)
        if missing:
            raise ValueError(f"the checkpoint lacks {sorted(missing)}")
        stateful = {
            "optimizers": state.optimizers,
            "schedulers": state.schedulers,
            "algorithms": self.engine.algorithms,
            "callbacks": self.engine.callbacks,
        }
        for key, items in stateful.items():
            if len(checkpoint[key]) != len(items):
                raise ValueError(f"the checkpoint has {len(checkpoint[key])} {key}, this trainer {len(items)}")
        model_state = unwrap(state.model).state_dict()
        mismatch = describe_mismatch(model_state, checkpoint["model"], "the checkpoint") or describe_mismatch(
            checkpoint["model"], model_state, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"the checkpoint is of another model: {mismatch}")
        before = _copy_state(
            {
                "model": model_state,
                "optimizers": [self._optimizer_state(o) for o in state.optimizers],
                **{
                    key: [item.state_dict() for item in items] for key, items in stateful.items() if key != "optimizers"
                },
            }
        )
        try:
            self._load_stateful(checkpoint, stateful)
        except BaseException:
            self._load_stateful(before, stateful)  # a checkpoint refused half-way changes nothing
            raise
        state.timestamp.load_state_dict(checkpoint["timestamp"])
        state.eval_history = list(checkpoint["eval_history"])
        self.seed = int(checkpoint["seed"])
        self._epoch_rng = checkpoint["epoch_rng"]
        self._resume_rng = checkpoint["rng"]
        if self._scaler is not None and checkpoint.get("grad_scaler"):
            self._scaler.load_state_dict(checkpoint["grad_scaler"])

    def _load_stateful(self, checkpoint: dict[str, Any], stateful: dict[str, list[Any]]) -> None:
        unwrap(self.state.model).load_state_dict(checkpoint["model"])
        for optimizer, saved in zip(self.state.optimizers, checkpoint["optimizers"]):
            self._load_optimizer_state(optimizer, saved)
        for key, items in stateful.items():
            if key != "optimizers":
                for item, saved in zip(items, checkpoint[key]):
                    item.load_state_dict(saved)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint to ``save_folder`` (none without one); returns its path.

        With DDP rank 0 writes it and every rank waits until it is written (every rank holds the same state).
        With FSDP it is a folder (:mod:`emakit.trainer.sharded`): every rank writes its shards through
        ``torch.distributed.checkpoint``. Every rank reads it on resume: a folder all of them can read.
        """
        if self.save_folder is None:
            return None
        timestamp = self.state.timestamp
        path = self.save_folder / checkpoint_name(timestamp.epoch, timestamp.batch, sharded=self._fsdp)
        if self._fsdp:
            save_sharded_checkpoint(path, self.state_dict())
        elif distributed.is_main():
            save_checkpoint(path, self.state_dict())
        if distributed.is_main() and self.save_num_checkpoints_to_keep > 0:
            for old in list_checkpoints(self.save_folder)[: -self.save_num_checkpoints_to_keep]:
                remove_checkpoint(old)
        distributed.barrier()
        return path

    def _resume(self) -> None:
        """Load ``load_path``, or with ``autoresume`` the newest readable checkpoint in ``save_folder``."""
        if self.save_folder is not None and distributed.is_main():
            remove_partial_files(self.save_folder)
        distributed.barrier()  # every rank sees the same checkpoints
        candidates = [self.load_path] if self.load_path is not None else []
        if self.autoresume and self.save_folder is not None:
            candidates = list(reversed(list_checkpoints(self.save_folder))) or candidates
        self.load_path, self.autoresume = None, False
        for path in candidates:
            try:
                checkpoint = (
                    load_sharded_checkpoint(path, self.state_dict()) if path.is_dir() else load_checkpoint(path)
                )
            except ValueError as error:
                if len(candidates) == 1 or path == candidates[-1]:
                    raise
                warnings.warn(f"autoresume: skipping an unreadable checkpoint: {error}", stacklevel=3)
                continue
            try:
                self.load_state_dict(checkpoint)
            except (KeyError, RuntimeError, ValueError) as error:
                raise ValueError(f"checkpoint {str(path)!r} does not fit this run: {error}") from error
            return
