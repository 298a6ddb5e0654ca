"""The state of :class:`~emakit.shadow.ShadowWeights`: what a checkpoint holds, what a plain model loads, and
``ema_model``'s copy of the average (made at the first request after the average changed).

A state holds this process's data of each average as :func:`emakit.storage.sharded.present` shows it (DTensors
for FSDP2 shards, plain 1-D partitions for ZeRO-3, with :meth:`ShadowState.partitioning` saying whose); exports
gather full tensors one at a time (:meth:`ShadowState.full_averages`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from emakit.average_module import average_module, gathered_module
from emakit.distributed.environment import is_main
from emakit.shadow.layout import UNKNOWN, Unknown
from emakit.storage import Group
from emakit.storage.ranks import ENGINE
from emakit.storage.sharded import (
    check_partitioning,
    export_names,
    exported,
    is_dtensor,
    localized,
    present,
)  # fmt: skip
from emakit.storage.sliced import RankSliced
from emakit.tracked import describe_mismatch, match_wrapped_names, unwrap

__all__ = ["ShadowState"]


class ShadowState:
    """:class:`~emakit.shadow.ShadowWeights`' state: ``state_dict``, ``load_state_dict``, ``model_state_dict``, and
    the ``ema_model`` module."""

    _groups: list[Group]
    _pending: dict[str, torch.Tensor] | None
    _pending_partitioning: dict | Unknown | None
    _skeleton: nn.Module | None
    _snapshot: nn.Module | None
    state_dict_keys: dict[str, str]

    _settle: Callable[[], None]  # AsynchronousUpdates
    attach: Callable[[nn.Module], nn.Module]  # ShadowLayout
    if TYPE_CHECKING:

        @property
        def swapped(self) -> bool: ...  # Swaps

    def _current(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            for name, tensor, holder in group.current_averages():
                yield name, present(tensor, holder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by the model's tensor names (copies while swapped in; empty before any model)."""
        self._settle()
        if not self._groups:
            return dict(self._pending or {})
        if self.swapped:
            return {name: t.detach().clone() for name, t in self._current()}
        return {name: t.detach() for name, t in self._current()}

    def partitioning(self) -> dict | None:
        """Whose data this average holds: ZeRO-3's partitions (:func:`emakit.storage.sharded.partitioning`: rank and
        world size), ``shard_over_ranks``' slices (:func:`emakit.storage.ranks.record`: rank, world size and the
        elements split), else None. A state saved here loads only where it is the same."""
        if not self._groups:
            return None if self._pending_partitioning is UNKNOWN else self._pending_partitioning
        records = [r for r in (group.partitioning() for group in self._groups) if r is not None]
        if not records:
            return None
        if records[0].get("engine") == ENGINE:  # one record for the groups split over ranks: their elements in all
            return {**records[0], "total": sum(r["total"] for r in records if r.get("engine") == ENGINE)}
        return records[0]

    def _carried(self) -> dict[str, torch.Tensor]:
        """The average by name, to carry into a new layout: whole tensors, gathered to every rank where this rank
        holds slices only (collective then: every rank lays out again, as data parallelism changes models alike)."""
        if any(isinstance(group, RankSliced) for group in self._groups):
            return {name: value for name, value in self.full_averages(everywhere=True) if value is not None}
        return dict(self._current())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], partitioning: dict | Unknown | None = UNKNOWN) -> None:
        """Set the average from ``state`` (as :meth:`state_dict` gives it), now or at the next attach.

        ``partitioning``: :meth:`partitioning` where ``state`` was saved; a state of other ranks' ZeRO-3
        partitions (another world size, another rank) is refused, naming both.
        """
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"EMA state must map tensor names to tensors; entry {bad!r} does not")
        self._settle()
        if not state:  # the state of an average that has not started: nothing to restore
            return
        if not self._groups:
            self._pending = {name: tensor.detach().clone() for name, tensor in state.items()}
            self._pending_partitioning = partitioning
            return
        if self.swapped:
            raise RuntimeError("cannot load EMA state while the EMA weights are swapped in")
        self._load_into_groups(state, partitioning)

    def _load_into_groups(self, state: dict[str, torch.Tensor], partitioning: dict | Unknown | None) -> None:
        """Copy ``state`` (this process's data of each average, as :meth:`state_dict` gives it) into the groups."""
        if partitioning is not UNKNOWN:
            check_partitioning(partitioning, self.partitioning())
        self._snapshot = None
        current = dict(self._current())
        state = match_wrapped_names(state, current)
        tensors = {name: t for group in self._groups for name, t in zip(group.names, group.tensors)}
        state = {name: localized(tensors[name], v) if name in tensors else v for name, v in state.items()}  # parts
        mismatch = describe_mismatch(current, state, "the loaded EMA state") or describe_mismatch(
            state, current, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"EMA state does not match the model: {mismatch}")
        for name, tensor in current.items():
            tensor.copy_(state[name])

    def full_averages(self, copy: bool = True, everywhere: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(name, full average)`` one tensor at a time, in the model's ``state_dict`` order (the same on every
        rank): a tensor where this rank receives it, None where it does not (ZeRO-3, FSDP1 and ``shard_over_ranks``:
        ranks other than 0, unless ``everywhere`` for ``shard_over_ranks``). Names are export names
        (:attr:`state_dict_keys`' values): an FSDP1 FlatParameter's average stands for several.

        Sharded averages are gathered (each group's :meth:`~emakit.storage.Group.gathered`, or
        :func:`emakit.storage.sharded.exported` for a FlatParameter; collective: every rank iterates to the end);
        others are copies, or with ``copy=False`` the average's own memory (read it, never write it). A loaded
        average not laid out for a model yet gathers DTensors; partitions, flat shards and slices need their model.
        """
        self._settle()
        names = dict.fromkeys(self.state_dict_keys.values())
        if self._groups:
            held = {
                name: (group, index, holder)
                for group in self._groups
                for index, (name, _, holder) in enumerate(group.current_averages())
            }
            owner = {
                export: name
                for name, (group, index, _) in held.items()
                for export in export_names(name, group.tensors[index])
            }
            for name in dict.fromkeys(owner[export] for export in names):
                group, index, holder = held[name]
                tensor = group.tensors[index]
                if export_names(name, tensor) != [name]:  # an FSDP1 FlatParameter: its original parameters, each
                    yield from exported(name, tensor, holder, copy=copy or self.swapped)
                else:
                    yield name, group.gathered(index, holder, copy=copy or self.swapped, everywhere=everywhere)
            return
        if self.partitioning() is not None:
            raise RuntimeError(
                "the EMA holds partitions (ZeRO-3), flat shards (FSDP1) or slices (shard_over_ranks) loaded from a "
                "state and has not seen its model since: update it or swap it into the model (ema.ema_weights(model)) "
                "before exporting"
            )
        pending = self._pending or {}
        for name in names:
            value = pending[name]
            yield name, value.full_tensor() if is_dtensor(value) else value.detach().clone() if copy else value

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The average keyed like the model's ``state_dict`` (tied tensors: one copy under each of their names),
        detached copies the EMA never writes again. Sharded averages are gathered (collective: every rank calls);
        ZeRO-3 partitions and FSDP1 flat shards to rank 0 only: the other ranks get an empty dict."""
        copies = dict(self.full_averages())
        received = {name: value for name, value in copies.items() if value is not None}
        if len(received) < len(copies):
            return {}
        return {key: received[name] for key, name in self.state_dict_keys.items()}

    def whole_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`state_dict` with whole tensors, as CPU copies on rank 0 and an empty dict on the other ranks: a
        state for a checkpoint that rank 0 writes alone, which loads on any number of ranks (each keeps its part).

        Sharded averages are gathered one tensor at a time (collective: every rank calls) and each gathered tensor
        is dropped at once where it is not kept: no rank holds more than one gathered tensor beside rank 0's copies.
        """
        main = is_main()
        copies: dict[str, torch.Tensor] = {}
        for name, value in self.full_averages(copy=False):
            if main:
                assert value is not None  # rank 0 receives every tensor (full_averages)
                copies[name] = value.detach().to("cpu", copy=True)
        return copies

    def main_state_dict(self) -> dict[str, torch.Tensor]:
        """The average keyed like the model's ``state_dict``, as CPU copies on rank 0 (the process that writes files)
        and an empty dict on the other ranks: what an export writes (gathered as :meth:`whole_state_dict`)."""
        copies = self.whole_state_dict()
        return {key: copies[name] for key, name in self.state_dict_keys.items()} if copies else {}

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
            whose = self.partitioning()
            if whose is not None and whose.get("engine") != ENGINE:  # shard_over_ranks: gathered to every rank below
                raise ValueError(
                    f"ema_model of a model sharded by {whose['engine']} is not made (its structure "
                    "cannot be copied, and the average is gathered to rank 0 only): evaluate with "
                    "`with ema.ema_weights(model):` (DeepSpeed: engine.module), or take ema.ema_state_dict() on "
                    "rank 0 (call it on every rank) and load it into a plain model"
                )
            if any(group.sharded for group in self._groups):
                self._snapshot = gathered_module(self._skeleton, dict(self._current()))
            elif any(isinstance(group, RankSliced) for group in self._groups):  # slices: gathered to every rank
                gathered = self.full_averages(copy=False, everywhere=True)
                whole = {name: value for name, value in gathered if value is not None}
                named = [(name, t, whole[name]) for group in self._groups for name, t, _ in group.current_averages()]
                self._snapshot = average_module(model, named)
            else:
                averages = [entry for group in self._groups for entry in group.current_averages()]
                self._snapshot = average_module(model, averages)
        return self._snapshot
