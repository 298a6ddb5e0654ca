"""Post-hoc EMA: choose the EMA's length after training (Karras et al. 2024, EDM2).

From "Analyzing and Improving the Training Dynamics of Diffusion Models".

During training, power-function EMAs of the weights are kept, one per ``sigma_rel``. At time
``t`` (in optimizer steps) the average weighs the weights of time ``tau <= t`` by ``tau ** gamma``,
which is what the per-update factor ::

    beta = (1 - dt / t) ** (gamma + 1)          ema = beta * ema + (1 - beta) * w

gives when the average is updated every ``dt`` steps (the first update, ``t = dt``, copies). The
relative width of that profile is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``,
and ``gamma`` is the largest real root of ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma +
(12 - sigma_rel**-2)``. Unrolled, the weights of update step ``t_k`` weigh
``(t_k ** (gamma + 1) - t_(k-1) ** (gamma + 1)) / t ** (gamma + 1)`` in the average at ``t``.

Every ``snapshot_interval`` a snapshot of each average (at its last update's step) is written to
``phema-<step>-<sigma_rel>.pt``, atomically (:func:`emakit.atomic.atomic_write`): a crash leaves the
previous file or the new one. A snapshot holds every ``state_dict`` key of the model, full tensors:

* The averages are laid out for the model passed to :meth:`PostHocEMA.update` before a snapshot is
  written, so a run resumed from a state (which holds the averages but no model) writes the same
  snapshots as an uninterrupted one, also when ``update_interval`` and ``snapshot_interval`` do not
  line up. A snapshot without weights is never written: RuntimeError instead.
* Under FSDP2 (``fully_shard``) the averages are DTensor shards: :meth:`PostHocEMA.write_snapshots`
  gathers them one tensor at a time (``full_tensor()``, a collective: every rank calls it, which
  ``update`` and the Trainer do), and rank 0 writes. In a Trainer the averages are laid out for the
  sharded model at ``Event.BEFORE_LOAD``, so that a sharded checkpoint loads into them.

After training, :func:`synthesize` finds the mix of snapshots whose profile is closest, in least
squares, to the profile of any other ``sigma_rel`` at any time, and returns those weights: the inner
product of two profiles has a closed form, so the mix solves a small linear system, normalised to sum
to one. Example::

    phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="1000ba", folder="runs/phema")
    Trainer(..., algorithms=[phema]).fit()                      # or phema.update(model) per step
    weights = synthesize("runs/phema", sigma_rel=0.08)          # {state_dict key: tensor}
    model.load_state_dict(weights)
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from emakit.atomic import atomic_path, atomic_write
from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.core.state import State
from emakit.loggers import Logger
from emakit.shadow import ShadowWeights
from emakit.time import Time, TimeUnit, as_time

__all__ = [
    "PostHocEMA",
    "gamma_from_sigma_rel",
    "sigma_rel_from_gamma",
    "snapshot_coefficients",
    "snapshots_in",
    "synthesize",
]

_SNAPSHOT = re.compile(r"^phema-(?P<t>[0-9]+)-(?P<sigma>[0-9.]+)\.pt$")
_STATE_VERSION = 1


def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the power-function profile ``tau ** gamma`` (EDM2, Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel``: the largest real root of EDM2's cubic (Eq. 126).

    ``sigma_rel_from_gamma`` falls from 0.2887 at ``gamma = 0`` towards 0, so the root is found by
    bisection on ``gamma >= 0``, to float precision.

    Example::

        >>> round(gamma_from_sigma_rel(0.10), 2)
        6.94
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < 0.2886:
        raise ValueError(f"sigma_rel={sigma_rel!r} must be a number in (0, 0.2886), e.g. 0.05 or 0.10")
    low, high = 0.0, 1.0
    while sigma_rel_from_gamma(high) > sigma_rel:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sigma_rel_from_gamma(middle) > sigma_rel else (low, middle)
    return (low + high) / 2


def _profile_products(t_a: torch.Tensor, g_a: torch.Tensor, t_b: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """The inner products of normalised power-function profiles (EDM2, Eq. 151), pairwise, in float64.

    ``<p_a, p_b> = (g_a + 1)(g_b + 1) (t_a / t_b) ** e / ((g_a + g_b + 1) max(t_a, t_b))``, ``e`` being
    ``g_b`` where ``t_a < t_b``, else ``-g_a``.
    """
    t_a, g_a, t_b, g_b = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    exponent = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** exponent / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def snapshot_coefficients(times: Sequence[float], gammas: Sequence[float], at: float, gamma: float) -> torch.Tensor:
    """The mix of snapshots (taken at ``times`` with exponents ``gammas``) closest to the profile ``(at, gamma)``.

    Solves ``A x = b`` in least squares, ``A`` holding the snapshots' profile products and ``b`` their
    products with the target (EDM2, Algorithm 3), in float64; then normalises ``x`` to sum to one.
    """
    t = torch.tensor(times, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = _profile_products(t, g, t, g)
    b = _profile_products(
        t, g, torch.tensor([float(at)], dtype=torch.float64), torch.tensor([gamma], dtype=torch.float64)
    )
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    return x / x.sum()


class PostHocEMA(Algorithm):
    """Power-function EMAs of a model's weights, one per ``sigma_rel``, with snapshots for :func:`synthesize`.

    Args:
        sigma_rels: the profiles' relative widths to track (EDM2 uses 0.05 and 0.10).
        snapshot_interval: how often to write a snapshot of every average, in batches (``"1000ba"``).
        folder: where snapshots go (``phema-<step>-<sigma_rel>.pt``, written atomically).
        update_interval: how often to update the averages, in batches; the step size ``dt`` of the
            update factor absorbs it, so the profile does not depend on it.
        ema_dtype: the averages' dtype (``"auto"``: fp32 for bf16/fp16 weights).

    In a :class:`~emakit.Trainer` it updates at batch ends and never swaps: pick the length after
    training with :func:`synthesize` or ``emakit posthoc FOLDER --sigma-rel 0.08``. By hand, call
    :meth:`update` once per optimizer step.
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

    @staticmethod
    def _batches(value: str | Time, name: str) -> int:
        time = as_time(value, name=name)
        if time.unit is not TimeUnit.BATCH or time.value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive number of batches, e.g. '100ba'")
        return int(time.value)

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
            missing = sorted({name for name in keys.values() if name not in average})
            if not average or not keys or missing:
                what = f"misses {missing[:5]}" if missing else "has no weights"
                raise RuntimeError(
                    f"PostHocEMA: the average of sigma_rel={sigma_rel} {what} to write (it was loaded from a "
                    "state and has not been laid out for a model since); pass the model: write_snapshots(model)"
                )
            averages.append((average, keys))
        main = not dist.is_initialized() or dist.get_rank() == 0
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for (average, keys), sigma_rel, gamma in zip(averages, self.sigma_rels, self.gammas):
            tensors = {}
            for name in dict.fromkeys(keys.values()):  # one tensor at a time, in the same order on every rank
                value = average[name]
                if isinstance(value, DTensor):
                    value = value.full_tensor()  # collective; a fresh tensor, dropped at once on other ranks
                elif not main:
                    continue
                if main:
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

    # --------------------------------------------------------------- trainer
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BATCH_END, Event.BEFORE_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.BEFORE_LOAD:  # allocate now: a sharded checkpoint is loaded into the averages in place
            self.attach(state.model)
        else:
            self.update(state.model)

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


def snapshots_in(folder: str | os.PathLike) -> list[tuple[int, float, Path]]:
    """``(step, sigma_rel, path)`` of every snapshot in ``folder``, in order of step."""
    found = []
    if not Path(folder).is_dir():
        return found
    for path in Path(folder).iterdir():
        match = _SNAPSHOT.match(path.name)
        if match:
            found.append((int(match["t"]), float(match["sigma"]), path))
    return sorted(found)


def synthesize(
    folder: str | os.PathLike,
    sigma_rel: float,
    at: int | None = None,
    sources: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The weights of a power-function EMA of width ``sigma_rel`` at step ``at`` (default: the last snapshot's).

    Mixes the snapshots of ``folder`` taken at or before ``at`` (of the ``sources`` sigma_rels only,
    if given) by :func:`snapshot_coefficients`, reading one snapshot at a time: floating-point tensors
    are summed in float64 (memory: twice an fp32 model, plus one snapshot) and returned in their stored
    dtype; other tensors are taken from the latest snapshot. Keys are the model's ``state_dict``
    keys: ``model.load_state_dict(synthesize(...))``.
    """
    gamma = gamma_from_sigma_rel(sigma_rel)
    found = snapshots_in(folder)
    if at is None and found:
        at = found[-1][0]
    chosen = [(t, s, p) for t, s, p in found if 0 < t <= (at or 0) and (sources is None or s in sources)]
    if not chosen:
        raise ValueError(f"no snapshots in {str(folder)!r} at or before step {at} (sources {sources})")
    headers = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for _, _, p in chosen]  # no copy
    x = snapshot_coefficients([h["t"] for h in headers], [h["gamma"] for h in headers], at, gamma)
    del headers
    mixed: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coefficient, (_, _, path) in zip(x.tolist(), chosen):  # one snapshot in memory at a time
        weights = torch.load(path, map_location="cpu", weights_only=True)["weights"]
        for key, value in weights.items():
            if not value.is_floating_point():
                mixed[key] = value.clone()  # integer tensors: the latest snapshot's
                continue
            dtypes[key] = value.dtype
            term = coefficient * value.double()
            mixed[key] = term if key not in mixed else mixed[key].add_(term)
    return {key: value.to(dtypes[key]) if key in dtypes else value for key, value in mixed.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a PostHocEMA snapshot folder")
    parser.add_argument("--sigma-rel", type=float, required=True, help="the EMA's relative width, e.g. 0.08")
    parser.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    parser.add_argument("--at", type=int, default=None, help="the step to synthesize at (default: the last snapshot)")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    try:
        weights = synthesize(args.folder, args.sigma_rel, at=args.at)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"emakit posthoc: {error}") from None
    with atomic_path(args.out) as partial:  # the previous file stays whole until the new one is
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, str(partial), metadata={"producer": "emakit posthoc"}
        )
    print(f"wrote {len(weights)} tensors of a sigma_rel={args.sigma_rel} EMA to {args.out}")
    return 0
