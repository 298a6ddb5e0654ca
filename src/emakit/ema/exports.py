"""Copies of an :class:`~emakit.EMA`'s average that leave it: ``ema_model``, ``ema_state_dict``, a safetensors file.

Each is a copy the EMA never writes again: writes to it, ``.to()``, ``.half()`` or fine-tuning never reach the
average. Sharded (FSDP2) averages are gathered: collective, every rank calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from emakit.export import save_state_dict
from emakit.shadow import ShadowWeights

__all__ = ["EMAExports"]


class EMAExports:
    """:class:`~emakit.EMA`'s copies of the average: :attr:`ema_model`, :meth:`ema_state_dict`,
    :meth:`save_ema_weights`."""

    shadows: list[ShadowWeights]
    started: bool

    _average: Callable[[int | str], ShadowWeights]  # EMASwaps
    _require_average: Callable[[], None]  # EMASwaps

    def remember_structure(self, model: nn.Module) -> None:
        """Keep a weightless copy of ``model``'s structure for :attr:`ema_model`; call before FSDP2 shards it.

        The Trainer does this itself when it shards the model (``parallelism="fsdp"``).
        """
        for shadow in self.shadows:
            shadow.remember_structure(model)

    @property
    def ema_model(self) -> nn.Module:
        """A module of the model's type holding a copy of the first average — what timm's ``ModelEmaV3.module``
        and torch's ``AveragedModel.module`` hold.

        The module owns its tensors: evaluating it, ``.to()``, ``.half()``, ``load_state_dict`` or
        fine-tuning it never reach the average. It is made at the first access after the average
        changed (an update, a load) and the same object is returned until the next change; it costs a
        copy of the model while held. Its averaged tensors have the average's dtype (fp32 for a bf16
        model with ``ema_dtype="auto"``). To evaluate without a copy, use ``with ema.ema_weights(model):``.
        For an FSDP2-sharded model it is a plain module holding the gathered average (collective: read
        it on every rank).
        """
        return self.ema_model_at(0)

    @property
    def module(self) -> nn.Module:
        """:attr:`ema_model` under the name timm's ``ModelEmaV3`` and torch's ``AveragedModel`` give it."""
        return self.ema_model

    def ema_model_at(self, index: int | str) -> nn.Module:
        """:attr:`ema_model` of average ``index``: its position (several half-lives: in the order given) or its label
        (``"200ba"``, ``"ema@200ba"``)."""
        shadow = self._average(index)
        self._require_average()
        model = shadow.attached_model()
        if model is None:
            raise RuntimeError("the EMA has not seen its model yet: call get_ema_model(model) instead")
        return shadow.module(model)

    def ema_state_dict(self, index: int | str = 0) -> dict[str, torch.Tensor]:
        """Average ``index`` as a ``state_dict`` of the model: detached copies, keyed like ``model.state_dict()``.

        ``model.load_state_dict(ema.ema_state_dict())`` puts the average into a plain model (with
        ``strict=False`` when ``include``/``exclude``/``buffers`` left tensors untracked: only tracked
        ones are in it). Averages of bf16/fp16 weights are fp32 (``ema_dtype="auto"``); ``load_state_dict``
        casts them. For an FSDP2-sharded model the shards are gathered (collective: call it on every rank).
        """
        shadow = self._average(index)
        self._require_average()
        return shadow.model_state_dict()

    def save_ema_weights(self, path: str | Path, index: int | str = 0) -> Path:
        """Write average ``index``'s weights to ``path`` as safetensors, keyed like the model's ``state_dict``.

        The file loads into a plain model: ``model.load_state_dict(safetensors.torch.load_file(path))``.
        Sharded averages (FSDP2 shards, ZeRO-3 partitions) are gathered one tensor at a time to rank 0, which
        writes: call it on every rank.
        """
        shadow = self._average(index)
        if not self.started:
            raise ValueError("the EMA has not started: there are no EMA weights to save")
        return save_state_dict(shadow.main_state_dict(), path)
