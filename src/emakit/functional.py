"""The EMA math as plain functions: the functional form of the algorithm.

One EMA update, for every floating-point parameter and buffer::

    ema = smoothing * ema + (1 - smoothing) * param   ==   ema.lerp_(param, 1 - smoothing)

Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, never averaged.

Example, in any training loop::

    ema_model = copy.deepcopy(model)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        compute_ema(model, ema_model, smoothing=0.99)
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from emakit.storage.unsupported import refuse_unsupported
from emakit.tracked import Change, TrackedTensors, describe_mismatch, is_averaged, unwrap

__all__ = ["check_smoothing", "check_warmup", "compute_ema", "smoothing_from_half_life", "warmup_smoothing"]


def smoothing_from_half_life(half_life: float, update_interval: float = 1) -> float:
    """The smoothing that halves a term's weight every ``half_life`` time, updating every ``update_interval``.

    ``smoothing = 2 ** (-(update_interval / half_life))``, both in the same unit.

    Example::

        >>> smoothing_from_half_life(1)      # the weight of a term halves at every update
        0.5
        >>> smoothing_from_half_life(100)    # update every batch, half-life of 100 batches
        0.9930924954370359
    """
    for name, value in (("half_life", half_life), ("update_interval", update_interval)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return 2.0 ** (-(update_interval / half_life))


def check_smoothing(
    smoothing: float, *, low_inclusive: bool = True, high_inclusive: bool = True, name: str = "smoothing"
) -> float:
    """``smoothing`` as a float once it lies in [0, 1] (or the open ends asked for); errors call it ``name``."""
    low, high = ("[" if low_inclusive else "("), ("]" if high_inclusive else ")")
    is_number = isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
    if not is_number or math.isnan(smoothing):
        raise ValueError(f"{name}={smoothing!r} must be a number in {low}0, 1{high}")
    above_low = smoothing >= 0 if low_inclusive else smoothing > 0
    below_high = smoothing <= 1 if high_inclusive else smoothing < 1
    inside = above_low and below_high
    if not inside:
        raise ValueError(f"{name}={smoothing!r} must lie in {low}0, 1{high}")
    return float(smoothing)


Warmup = tuple  # ("tf",) or ("power", gamma, power): see check_warmup


def check_warmup(warmup: str | tuple | None) -> Warmup | None:
    """``warmup`` as ``None``, ``("tf",)`` or ``("power", gamma, power)``; ValueError naming what is allowed.

    Accepted: ``None``; ``"tf"``; ``("power", gamma, power)`` with ``gamma > 0`` and ``power > 0``
    (timm and diffusers use ``gamma=1`` with ``power=2/3`` or ``3/4``).
    """
    if warmup is None:
        return None
    if warmup == "tf":
        return ("tf",)
    if isinstance(warmup, (tuple, list)) and len(warmup) == 3 and warmup[0] == "power":
        _, gamma, power = warmup
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (gamma, power)
        )
        if numbers and gamma > 0 and power > 0:
            return ("power", float(gamma), float(power))
    raise ValueError(
        f"warmup={warmup!r} must be None, 'tf', or ('power', gamma, power) with gamma > 0 and power > 0, "
        "e.g. ('power', 1, 2/3)"
    )


def warmup_smoothing(smoothing: float, n: int, warmup: Warmup | None, min_smoothing: float = 0.0) -> float:
    """The smoothing of an update that follows ``n`` earlier ones (the average's start counts as one).

    ``None``: ``smoothing``. ``"tf"`` (TensorFlow, torch_ema, diffusers' default):
    ``min(smoothing, (1 + n) / (10 + n))``. ``("power", g, p)`` (timm ``ModelEmaV3``, diffusers
    ``use_ema_warmup``): ``min(smoothing, 1 - (1 + n / g) ** -p)``. Both are then raised to at least
    ``min_smoothing``. Early updates so weigh the recent weights more, and the average does not
    lag behind its random start.

    Example::

        >>> warmup_smoothing(0.999, 1, ("tf",))        # the second update of an average
        0.18181818181818182
        >>> warmup_smoothing(0.999, 10**6, ("tf",))    # long after: the smoothing itself
        0.999
    """
    if warmup is None:
        return smoothing
    ramp = (1 + n) / (10 + n) if warmup[0] == "tf" else 1 - (1 + n / warmup[1]) ** -warmup[2]
    return max(min(ramp, smoothing), min_smoothing)


@dataclass
class _TensorPairs:
    """EMA tensors and their sources that share (device, dtype) on both sides."""

    ema: list[torch.Tensor] = field(default_factory=list)
    source: list[torch.Tensor] = field(default_factory=list)

    def source_like_ema(self) -> list[torch.Tensor]:
        ema = self.ema[0]
        if self.source[0].dtype == ema.dtype and self.source[0].device == ema.device:
            return self.source
        return [t.to(device=ema.device, dtype=ema.dtype) for t in self.source]


@dataclass
class _Plan:
    """What one ``compute_ema(model, ema_model)`` call does, cached per ``ema_model``."""

    sources: TrackedTensors
    targets: TrackedTensors
    averaged: list[_TensorPairs]
    copied: list[_TensorPairs]

    def still_valid(self, model: nn.Module) -> bool:
        """The same models holding the same tensors (moved ``.data`` of the same shape is read where it is now)."""
        if self.sources.model is not unwrap(model):
            return False
        for tracked in (self.sources, self.targets):
            change = tracked.check()
            if change is Change.STRUCTURE:
                return False
            if change is Change.MOVED:
                tracked.accept_moves()
        return True


_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _make_plan(model: nn.Module, ema_model: nn.Module) -> _Plan:
    sources, targets = TrackedTensors(unwrap(model)), TrackedTensors(unwrap(ema_model))
    refuse_unsupported(unwrap(model), sources.named)  # an engine's placeholders are never averaged
    refuse_unsupported(unwrap(ema_model), targets.named)
    mismatch = describe_mismatch(targets.named, sources.named, "model") or describe_mismatch(
        sources.named, targets.named, "ema_model"
    )
    if mismatch is not None:
        raise ValueError(f"compute_ema: model and ema_model differ in structure: {mismatch}")
    groups: dict[tuple, _TensorPairs] = {}
    for name, target in targets.named.items():
        source = sources.named[name]
        if is_averaged(target) != is_averaged(source):
            raise ValueError(f"compute_ema: tensor {name!r} is {source.dtype} in model but {target.dtype} in ema_model")
        key = (is_averaged(target), target.device, target.dtype, source.device, source.dtype)
        pairs = groups.setdefault(key, _TensorPairs())
        pairs.ema.append(target)
        pairs.source.append(source)
    return _Plan(
        sources=sources,
        targets=targets,
        averaged=[pairs for key, pairs in groups.items() if key[0]],
        copied=[pairs for key, pairs in groups.items() if not key[0]],
    )


@torch.no_grad()
def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place towards ``model``: ``ema = smoothing * ema + (1 - smoothing) * param``.

    Applies to every floating-point parameter and buffer of ``ema_model``, matched to
    ``model``'s by name; integer buffers are copied. ``smoothing=1`` leaves the average
    unchanged, ``smoothing=0`` copies the model. The two models may differ in dtype or
    device (an fp32 average of a bf16 model). Work is one ``torch._foreach_lerp_`` per
    (device, dtype) group; the matching is cached and redone only when either model's
    structure, dtypes or devices change.

    Raises:
        ValueError: ``smoothing`` outside [0, 1]; or the models differ in structure (the
            message names the first missing or differently shaped tensor).

    Example::

        >>> model, ema_model = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> compute_ema(model, ema_model, smoothing=0.0)
        >>> torch.equal(ema_model.weight, model.weight)
        True
    """
    weight = 1.0 - check_smoothing(smoothing)
    plan = _plans.get(ema_model)
    if plan is None or not plan.still_valid(model):
        plan = _plans[ema_model] = _make_plan(model, ema_model)
    for pairs in plan.averaged:
        torch._foreach_lerp_(pairs.ema, pairs.source_like_ema(), weight)
    for pairs in plan.copied:
        torch._foreach_copy_(pairs.ema, pairs.source)
