"""Checkpoints of :class:`~emakit.Trainer` and resuming from them.

:meth:`~TrainerResume.state_dict` is everything a run needs to continue exactly (the training weights, never
swapped-in averages); :meth:`~TrainerResume.load_state_dict` checks a checkpoint whole before it changes
anything; :meth:`~TrainerResume.save_checkpoint` writes one every ``save_interval`` and keeps the newest
``save_num_checkpoints_to_keep``; at the start of ``fit`` the run resumes from ``load_path``, or with
``autoresume`` from the newest readable checkpoint in ``save_folder``. The files themselves:
:mod:`emakit.trainer.checkpoint` (one file) and :mod:`emakit.trainer.sharded` (a folder under FSDP).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from emakit import distributed
from emakit.core import Engine, State
from emakit.tracked import describe_mismatch, unwrap
from emakit.trainer.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    remove_partial_files,
    save_checkpoint,
)
from emakit.trainer.rng import rng_state
from emakit.trainer.sharded import load_sharded_checkpoint, save_sharded_checkpoint

__all__ = ["TrainerResume"]


def _copy_state(state: Any) -> Any:
    """A copy of a nested state: tensors cloned (DTensors too: FSDP storages refuse deepcopy), the rest deep-copied."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copy_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(value) for value in state)
    return copy.deepcopy(state)


class TrainerResume:
    """:class:`~emakit.Trainer`'s checkpoints: :meth:`state_dict`, :meth:`load_state_dict`,
    :meth:`save_checkpoint`, and the resume at the start of ``fit`` (``load_path``, ``autoresume``)."""

    state: State
    engine: Engine
    seed: int
    save_folder: Path | None
    save_num_checkpoints_to_keep: int
    load_path: Path | None
    autoresume: bool
    _fsdp: bool
    _scaler: torch.amp.GradScaler | None
    _epoch_rng: torch.Tensor | None
    _resume_rng: dict[str, Any] | None

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
        checkpoint = {**checkpoint, "algorithms": [distributed.own_state(a) for a in checkpoint["algorithms"]]}
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

        With DDP rank 0 writes it and every rank waits until it is written (every rank holds the same state); an
        algorithm whose state differs per rank (``EMA(shard_over_ranks=True)``) has every rank's gathered into it
        (:func:`emakit.distributed.gather_states`), and each rank loads its own.
        With FSDP it is a folder (:mod:`emakit.trainer.sharded`): every rank writes its shards through
        ``torch.distributed.checkpoint``. Every rank reads it on resume: a folder all of them can read.
        """
        if self.save_folder is None:
            return None
        timestamp = self.state.timestamp
        path = self.save_folder / checkpoint_name(timestamp.epoch, timestamp.batch, sharded=self._fsdp)
        if self._fsdp:
            save_sharded_checkpoint(path, self.state_dict())
        else:
            algorithms = self.engine.algorithms
            per_rank = {
                i: distributed.gather_states(a.state_dict()) for i, a in enumerate(algorithms) if a.state_is_per_rank
            }
            if distributed.is_main():
                state = self.state_dict()
                state["algorithms"] = [per_rank.get(i, saved) for i, saved in enumerate(state["algorithms"])]
                save_checkpoint(path, state)
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
