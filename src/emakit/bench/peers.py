"""The implementations benchmarked: emakit's EMA (default and ``flatten_model``) and ``compute_ema``,
the original per-tensor arithmetic, and peers (every implementation not named ``emakit.*``).

Each is configured so that *every* call is a full update with the fixed smoothing ``s``
(no warmup schedule, no skipped steps) and is checked against the closed form before it is
timed (:func:`check_closed_form`). Peers are imported only when benchmarked; one that does not
import is skipped with the reason.
"""

from __future__ import annotations

import copy
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

from emakit import EMA
from emakit.functional import compute_ema

__all__ = ["IMPLEMENTATIONS", "MODES", "SMOOTHING", "Impl", "Mode", "check_closed_form", "import_error", "is_peer"]

SMOOTHING = 0.999


class Mode(TypedDict, total=False):
    """The EMA keyword arguments of one of emakit's modes (:data:`MODES`)."""

    flatten_model: bool


# emakit's EMA modes compared by the swap and memory benchmarks: name -> EMA keyword arguments
MODES: dict[str, Mode] = {"default": {}, "flatten_model": {"flatten_model": True}}


@dataclass
class Impl:
    """One EMA implementation bound to its own copy of the model."""

    name: str
    model: nn.Module
    step: Callable[[], object]  # one EMA update
    averages: Callable[[], list[torch.Tensor]]  # the averages of model.parameters(), in that order
    handle: Any = None  # the implementation's object (emakit's EMA and torch_ema's, for the swap benchmark)


def _emakit_ema(model: nn.Module, flatten_model: bool) -> Impl:
    ema = EMA(smoothing=SMOOTHING, flatten_model=flatten_model)
    names = [name for name, _ in model.named_parameters()]
    name = "emakit.EMA(flatten_model)" if flatten_model else "emakit.EMA"
    return Impl(name, model, lambda: ema.update(model), lambda: [ema.shadow.state_dict()[n] for n in names], ema)


def _emakit_compute_ema(model: nn.Module) -> Impl:
    ema_model = copy.deepcopy(model)
    return Impl(
        "emakit.compute_ema",
        model,
        lambda: compute_ema(model, ema_model, SMOOTHING),
        lambda: list(ema_model.parameters()),
    )


def _per_tensor(model: nn.Module) -> Impl:
    """Composer's original arithmetic, from its formula: ``ema.copy_(ema * s + param * (1 - s))`` per tensor.

    mul, mul, add, copy: nine passes over memory, and a Python walk of both models per call.
    """
    ema_model = copy.deepcopy(model)

    @torch.no_grad()
    def step() -> None:
        pairs = zip(
            itertools.chain(ema_model.parameters(), ema_model.buffers()),
            itertools.chain(model.parameters(), model.buffers()),
            strict=True,
        )
        for ema_t, t in pairs:
            ema_t.copy_(ema_t * SMOOTHING + t * (1.0 - SMOOTHING) if ema_t.is_floating_point() else t)

    return Impl("per_tensor", model, step, lambda: list(ema_model.parameters()))


def _averaged_model(model: nn.Module) -> Impl:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    # its first call copies the weights; buffers are copied every call (use_buffers=False)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(SMOOTHING))
    return Impl(
        "torch.AveragedModel",
        model,
        lambda: averaged.update_parameters(model),
        lambda: list(averaged.module.parameters()),
    )


def _torch_ema(model: nn.Module) -> Impl:
    from torch_ema import ExponentialMovingAverage

    # use_num_updates=False: else the decay is min(s, (1 + n) / (10 + n)), a warmup
    ema = ExponentialMovingAverage(model.parameters(), decay=SMOOTHING, use_num_updates=False)
    return Impl("torch_ema", model, ema.update, lambda: list(ema.shadow_params), ema)


def _ema_pytorch(model: nn.Module, foreach: bool) -> Impl:
    from ema_pytorch import EMA as LucidEMA

    # Every call averages: update_every=1, update_after_step=0 (its first call copies), and
    # min_value=beta pins its warmup decay 1 - (1 + n) ** -2/3, clamped to [min_value, beta], to beta.
    ema = LucidEMA(model, beta=SMOOTHING, update_after_step=0, update_every=1, min_value=SMOOTHING, use_foreach=foreach)
    name = "ema_pytorch.foreach" if foreach else "ema_pytorch"
    return Impl(name, model, ema.update, lambda: list(ema.ema_model.parameters()))


def _diffusers(model: nn.Module) -> Impl:
    from diffusers.training_utils import EMAModel

    # Without warmup its decay is min(decay, (1 + n) / (10 + n)) floored at min_decay, and 0 (a copy)
    # at the first step: min_decay=decay pins it to s from the second step on.
    ema = EMAModel(model.parameters(), decay=SMOOTHING, min_decay=SMOOTHING, use_ema_warmup=False, foreach=True)
    return Impl("diffusers.EMAModel", model, lambda: ema.step(model.parameters()), lambda: list(ema.shadow_params))


def _timm(model: nn.Module) -> Impl:
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(model, decay=SMOOTHING)  # foreach lerp over the state_dict; step=None: fixed decay
    return Impl("timm.ModelEmaV3", model, lambda: ema.update(model), lambda: list(ema.module.parameters()))


# (name, short column label, module that must import, factory)
IMPLEMENTATIONS: list[tuple[str, str, str | None, Callable[[nn.Module], Impl]]] = [
    ("emakit.EMA", "EMA", None, lambda m: _emakit_ema(m, flatten_model=False)),
    ("emakit.EMA(flatten_model)", "EMA.flat", None, lambda m: _emakit_ema(m, flatten_model=True)),
    ("emakit.compute_ema", "compute", None, _emakit_compute_ema),
    ("per_tensor", "per-tensor", None, _per_tensor),
    ("torch.AveragedModel", "Averaged", None, _averaged_model),
    ("torch_ema", "torch_ema", "torch_ema", _torch_ema),
    ("ema_pytorch", "ema_pt", "ema_pytorch", lambda m: _ema_pytorch(m, foreach=False)),
    ("ema_pytorch.foreach", "ema_pt.fe", "ema_pytorch", lambda m: _ema_pytorch(m, foreach=True)),
    ("diffusers.EMAModel", "diffusers", "diffusers.training_utils", _diffusers),
    ("timm.ModelEmaV3", "timm.V3", "timm.utils.model_ema", _timm),
]


def is_peer(name: str) -> bool:
    """Whether the implementation ``name`` is another's than emakit's."""
    return not name.startswith("emakit.")


def import_error(module: str | None) -> str | None:
    """Why ``module`` does not import (the error's first line), or None when it does."""
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install raises more than ImportError (timm -> torchvision)
        text = str(error).splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"
    return None


def check_closed_form(impl: Impl) -> None:
    """Shift every parameter by +1, update once, and require ``ema == s * ema + (1 - s) * param``.

    Call it when the average equals the weights (right after the first update). Raises
    ``RuntimeError`` naming the implementation when an average is off, so that no
    implementation is timed skipping its work.
    """
    params = list(impl.model.parameters())
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    impl.step()
    averages = impl.averages()
    if len(averages) != len(params):
        raise RuntimeError(f"{impl.name}: {len(averages)} averages for {len(params)} parameters")
    for index, (average, start) in enumerate(zip(averages, before, strict=True)):
        expected = start + (1.0 - SMOOTHING)  # s * start + (1 - s) * (start + 1)
        if not torch.allclose(average.float(), expected, rtol=1e-5, atol=1e-5):
            error = (average.float() - expected).abs().max().item()
            raise RuntimeError(
                f"{impl.name}: parameter {index} is {error:.3g} off the closed form after one "
                "update: it does not average as configured, so timing it would mislead"
            )
