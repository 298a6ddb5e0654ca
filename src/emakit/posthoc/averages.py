"""PostHocEMA by hand: power-function EMAs of the weights during training, one per ``sigma_rel``, and snapshots.

At step ``t``, ``dt`` steps after the last update::

    beta = (1 - dt / t) ** (gamma + 1)          ema = beta * ema + (1 - beta) * w

(the first update copies). Every ``snapshot_interval`` each average is written to
``phema-<step>-<sigma_rel>.pt`` for :func:`emakit.posthoc.synthesize`. It knows nothing of the trainer:
``PostHocEMA.as_algorithm()`` (:mod:`emakit.algorithms.posthoc`) runs it in one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit import distributed
from emakit.atomic import atomic_write
from emakit.deprecated import DeprecatedAlgorithmMethods
from emakit.posthoc.profiles import gamma_from_sigma_rel
from emakit.shadow import ShadowWeights
from emakit.time import Time, TimeUnit, as_interval

if TYPE_CHECKING:
    from emakit.algorithms.posthoc import PostHocEMAAlgorithm

__all__ = ["PostHocEMA"]

_STATE_VERSION = 1


class PostHocEMA(DeprecatedAlgorithmMethods):
    """Power-function EMAs of a model's weights, one per ``sigma_rel``, with snapshots for :func:`synthesize`.

    Args:
        sigma_rels: the profiles' relative widths to track (EDM2 uses 0.05 and 0.10).
        snapshot_interval: how often to write a snapshot of every average, in batches (``"1000ba"``).
        folder: where snapshots go (``phema-<step>-<sigma_rel>.pt``, written atomically).
        update_interval: how often to update the averages, in batches; the step size ``dt`` of the
            update factor absorbs it, so the profile does not depend on it.
        ema_dtype: the averages' dtype (``"auto"``: fp32 for bf16/fp16 weights).

    In a :class:`~emakit.Trainer` (``algorithms=[phema]``, which runs :meth:`as_algorithm`) it updates at
    batch ends and never swaps: pick the length after training with :func:`synthesize` or
    ``emakit posthoc FOLDER --sigma-rel 0.08``. By hand, call :meth:`update` once per optimizer step.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_interval: str | Time = "1000ba",
        folder: str | os.PathLike = "posthoc-ema",
        update_interval: str | Time = "1ba",
        ema_dtype: str | torch.dtype = "auto",
    ) -> None:
        if isinstance(sigma_rels, (int, float)) or not sigma_rels:
            raise ValueError(f"sigma_rels={sigma_rels!r} must be a non-empty sequence, e.g. (0.05, 0.10)")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels={sigma_rels!r} has repeats")
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.snapshot_interval = self._batches(snapshot_interval, "snapshot_interval")
        self.update_interval = self._batches(update_interval, "update_interval")
        self.folder = Path(folder)
        self.shadows = [ShadowWeights(ema_dtype=ema_dtype) for _ in self.sigma_rels]
        self.steps = 0  # optimizer steps counted so far
        self.last_update = 0  # the step of the last update (0: none yet)
        self._algorithm: PostHocEMAAlgorithm | None = None  # made by as_algorithm()

    @staticmethod
    def _batches(value: str | Time, name: str) -> int:
        return int(as_interval(value, name=name, units=(TimeUnit.BATCH,), examples=("100ba",)).value)

    # ------------------------------------------------------------- averaging
    def update(self, model: nn.Module) -> bool:
        """Count one optimizer step; update the averages (and write snapshots) when due. True when updated.

        At step ``t``, ``dt`` steps after the last update: ``ema = beta ema + (1 - beta) w`` with
        ``beta = (1 - dt / t) ** (gamma + 1)`` (the first update copies). Under FSDP2 call it on every
        rank: writing a snapshot gathers the shards.
        """
        self.steps += 1
        updated = False
        if self.steps % self.update_interval == 0:
            t, dt = self.steps, self.steps - self.last_update
            for shadow, gamma in zip(self.shadows, self.gammas):
                if self.last_update == 0:
                    shadow.copy_from_model(model)  # beta = (1 - dt/t) ** (gamma + 1) = 0: a copy
                else:
                    shadow.update(model, 1.0 - (1.0 - dt / t) ** (gamma + 1))
            self.last_update = t
            updated = True
        if self.steps % self.snapshot_interval == 0 and self.last_update > 0:
            self.write_snapshots(model)
        return updated

    def attach(self, model: nn.Module) -> None:
        """Lay every average out for ``model`` now (allocating it, or placing a loaded state in it)."""
        for shadow in self.shadows:
            shadow.attach(model)

    def write_snapshots(self, model: nn.Module | None = None) -> list[Path]:
        """Write every average's snapshot at its last update's step; returns the paths written (rank 0's).

        Each snapshot is ``{"t", "sigma_rel", "gamma", "weights"}``, ``weights`` keyed by the model's
        ``state_dict`` keys, written atomically. With ``model`` the averages are first laid out for it
        (needed after :meth:`load_state_dict` when no update has run since). Sharded (DTensor) averages
        are gathered one tensor at a time: a collective, so every rank must call; rank 0 writes, the
        others return ``[]``. Raises RuntimeError, writing nothing, before any update or when an
        average holds no weights (loaded from a state without its keys, and no model given).
        """
        if self.last_update == 0:
            raise RuntimeError(
                f"PostHocEMA.write_snapshots: no update yet (steps={self.steps}, update_interval="
                f"{self.update_interval}ba): there is no average to write"
            )
        if model is not None:
            self.attach(model)
        averages = []
        for shadow, sigma_rel in zip(self.shadows, self.sigma_rels):
            average = shadow.state_dict()
            keys = dict(shadow.state_dict_keys)
            # laid out for a model, every name is exported (an FSDP1 FlatParameter's average stands for several);
            # loaded from a state and not laid out since, only the names the state holds
            laid_out = shadow.attached_model() is not None
            missing = [] if laid_out else sorted({name for name in keys.values() if name not in average})
            if not average or not keys or missing:
                what = f"misses {missing[:5]}" if missing else "has no weights"
                raise RuntimeError(
                    f"PostHocEMA: the average of sigma_rel={sigma_rel} {what} to write (it was loaded from a "
                    "state and has not been laid out for a model since); pass the model: write_snapshots(model)"
                )
            averages.append((average, keys))
        main = distributed.is_main()
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for shadow, (_, keys), sigma_rel, gamma in zip(self.shadows, averages, self.sigma_rels, self.gammas):
            tensors = {}
            # one tensor at a time, in the same order on every rank: sharded ones gathered (collective; rank 0
            # receives them, other ranks drop theirs at once), the others read where they are
            for name, value in shadow.full_averages(copy=False):
                if main and value is not None:
                    tensors[name] = _own_cpu_copy(value)
            if not main:
                continue
            path = self.folder / f"phema-{self.last_update:010d}-{sigma_rel:.4f}.pt"
            snapshot = {
                "t": self.last_update,
                "sigma_rel": sigma_rel,
                "gamma": gamma,
                "weights": {key: tensors[name] for key, name in keys.items()},
            }
            with atomic_write(path) as file:
                torch.save(snapshot, file)
            del tensors, snapshot  # one average's full copy at a time
            paths.append(path)
        return paths

    def as_algorithm(self) -> PostHocEMAAlgorithm:
        """This PostHocEMA as an :class:`~emakit.Algorithm` for emakit's Trainer (updates at batch ends).

        ``Trainer(algorithms=[phema])`` calls it; one adapter per PostHocEMA, made at the first call.
        """
        algorithm = getattr(self, "_algorithm", None)
        if algorithm is None or algorithm.posthoc is not self:  # none yet, or a shallow copy's
            from emakit.algorithms.posthoc import PostHocEMAAlgorithm  # the trainer's side, imported when one runs

            algorithm = self._algorithm = PostHocEMAAlgorithm(self)
        return algorithm

    def state_dict(self) -> dict[str, Any]:
        """The clock, the averages (DTensor shards under FSDP2) and the model's keys they are saved under."""
        return {
            "version": _STATE_VERSION,
            "sigma_rels": list(self.sigma_rels),
            "steps": self.steps,
            "last_update": self.last_update,
            "weights": [shadow.state_dict() for shadow in self.shadows],
            "state_dict_keys": [dict(shadow.state_dict_keys) for shadow in self.shadows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"PostHocEMA state has version {state.get('version') if isinstance(state, dict) else state!r}"
            )
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(
                f"PostHocEMA state tracks sigma_rels {state['sigma_rels']}, this one {list(self.sigma_rels)}"
            )
        keys = state.get("state_dict_keys") or [{} for _ in self.shadows]  # absent from older states
        for shadow, weights, saved_keys in zip(self.shadows, state["weights"], keys):
            shadow.load_state_dict(weights)
            if shadow.attached_model() is None:  # a snapshot before the next attach writes under these keys
                shadow.state_dict_keys = dict(saved_keys)
        self.steps, self.last_update = int(state["steps"]), int(state["last_update"])


def _own_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU as a tensor whose storage holds its bytes only (``torch.save`` writes whole storages).

    A CPU tensor that already has a storage of its own (a gathered tensor, an average's slice) is not copied.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu()
    own = tensor.is_contiguous() and tensor.storage_offset() == 0
    if own and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()
