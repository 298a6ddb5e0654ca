"""The state of :class:`~emakit.shadow.ShadowWeights`: what a checkpoint holds, what a plain model loads, and
``ema_model``'s copy of the average (made at the first request after the average changed).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from emakit.average_module import average_module, gathered_module
from emakit.storage import Group
from emakit.tracked import describe_mismatch, is_dtensor, match_wrapped_names, unwrap

__all__ = ["ShadowState"]


def _like_model(model_tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (local data) presented like ``model_tensor``: a DTensor with its mesh and placements, or as is."""
    if not is_dtensor(model_tensor):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value,
        model_tensor.device_mesh,
        model_tensor.placements,
        run_check=False,
        shape=model_tensor.shape,
        stride=model_tensor.stride(),
    )


class ShadowState:
    """:class:`~emakit.shadow.ShadowWeights`' state: ``state_dict``, ``load_state_dict``, ``model_state_dict``, and
    the ``ema_model`` module."""

    _groups: list[Group]
    _pending: dict[str, torch.Tensor] | None
    _skeleton: nn.Module | None
    _snapshot: nn.Module | None
    state_dict_keys: dict[str, str]

    def _current(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            for name, tensor, holder in group.current_averages():
                yield name, _like_model(tensor, holder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by the model's tensor names (copies while swapped in; empty before any model)."""
        self._settle()
        if not self._groups:
            return dict(self._pending or {})
        if self.swapped:
            return {name: t.detach().clone() for name, t in self._current()}
        return {name: t.detach() for name, t in self._current()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the average from ``state`` (as :meth:`state_dict` gives it), now or at the next attach."""
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"EMA state must map tensor names to tensors; entry {bad!r} does not")
        self._settle()
        if not state:  # the state of an average that has not started: nothing to restore
            return
        if not self._groups:
            self._pending = {name: tensor.detach().clone() for name, tensor in state.items()}
            return
        if self.swapped:
            raise RuntimeError("cannot load EMA state while the EMA weights are swapped in")
        self._snapshot = None
        current = dict(self._current())
        state = match_wrapped_names(state, current)
        mismatch = describe_mismatch(current, state, "the loaded EMA state") or describe_mismatch(
            state, current, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"EMA state does not match the model: {mismatch}")
        for name, tensor in current.items():
            tensor.copy_(state[name])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The average keyed like the model's ``state_dict`` (tied tensors: one copy under each of their names),
        detached copies the EMA never writes again. Sharded averages are gathered (collective: every rank calls)."""
        averages = self.state_dict()
        copies: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(self.state_dict_keys.values()):
            value = averages[name]
            copies[name] = value.full_tensor() if is_dtensor(value) else value.detach().clone()
        return {key: copies[name] for key, name in self.state_dict_keys.items()}

    # ------------------------------------------------------------- ema_model
    def module(self, model: nn.Module) -> nn.Module:
        """A module of ``model``'s type holding a copy of the average, made at the first call after the average
        changed (see :mod:`emakit.average_module`): writes to it, ``.to()`` or ``.half()`` leave the average alone.

        For a sharded (FSDP2) model it is a plain, unsharded module holding the full average, gathered
        (collective: call it on every rank).
        """
        self._settle()
        model = self.attach(model) if not self.swapped else unwrap(model)
        if self._snapshot is None:
            if any(group.sharded for group in self._groups):
                self._snapshot = gathered_module(self._skeleton, dict(self._current()))
            else:
                averages = [entry for group in self._groups for entry in group.current_averages()]
                self._snapshot = average_module(model, averages)
        return self._snapshot
