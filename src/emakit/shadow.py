"""The EMA storage engine: the averaged weights of one model, kept in flat buffers.

Layout. The model's tracked tensors (see :mod:`emakit.tracked`) are grouped by
(kind, device, dtype), where kind is *averaged* (floating point) or *copied* (integer). Per
group the EMA lives in one flat buffer. The model's own tensors of the group are *bound*
into a flat buffer of the same layout: ``tensor.data`` becomes a view of it, so the
``Parameter`` objects stay the same and optimizers built before or after keep working.
Then, per group::

    update:    ema_flat.lerp_(model_flat, 1 - smoothing)    one kernel: the memory-bandwidth roofline
    swap in:   exchange the two buffers' data pointers       O(1), no weight data moved
    swap out:  exchange them back                            the training weights, bit for bit

When the EMA's dtype or device differs from the model's (an fp32 EMA of a bf16 model, an
EMA kept on the CPU), swap-in parks the training weights in a fresh buffer by the same
pointer exchange and cast-copies the EMA in; swap-out exchanges back and frees it.

Tensors that cannot be bound (not dense, tensor subclasses, storage shared with another
tracked tensor) are kept *loose* and updated with ``torch._foreach_lerp_``.

Staleness. A binding breaks when the model's tensors are re-pointed (``model.to(...)``,
``load_state_dict(assign=True)``, a replaced ``Parameter``). Before every use the engine
checks two cheap signals: the process-wide module-registration counter and the use count
of each bound storage. When either moved it walks the model; if anything changed it lays
the groups out again, carrying the EMA over by name. It never averages stale tensors.
"""

from __future__ import annotations

import collections
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from emakit.flat import FlatGroup, is_dense, local, storage_id
from emakit.side_stream import SideStream
from emakit.tracked import (
    describe_mismatch,
    fill_tensors,
    is_averaged,
    match_wrapped_names,
    skeleton_of,
    structure_generation,
    tracked_tensors,
    unwrap,
)

__all__ = ["ShadowWeights", "resolve_ema_dtype"]


def resolve_ema_dtype(ema_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the average of a floating-point tensor of ``model_dtype``.

    ``"auto"``: float32 for bf16/fp16 tensors (a bf16 average with smoothing 0.9999 rounds
    every update away), the tensor's own dtype otherwise. ``"same"``: the tensor's dtype.
    A ``torch.dtype``: that dtype.
    """
    if ema_dtype == "auto":
        return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype
    if ema_dtype == "same":
        return model_dtype
    if isinstance(ema_dtype, torch.dtype) and (ema_dtype.is_floating_point or ema_dtype.is_complex):
        return ema_dtype
    raise ValueError(f"ema_dtype={ema_dtype!r} must be 'auto', 'same' or a floating-point torch.dtype")


class ShadowWeights:
    """The average of one model's weights, in flat buffers, with update, swap and state.

    It knows nothing of schedules: callers say when to update and with which weight.

    Example::

        >>> model = nn.Linear(4, 4)
        >>> shadow = ShadowWeights()
        >>> shadow.copy_from_model(model)            # start the average at the weights
        >>> shadow.update(model, weight=0.01)         # ema = 0.99 * ema + 0.01 * param
        >>> shadow.swap_in(model)                     # the model now holds the average
        >>> shadow.swap_out(model)                    # and its own weights again, bit for bit
    """

    def __init__(
        self,
        ema_dtype: str | torch.dtype = "auto",
        ema_device: str | torch.device | None = None,
        async_update: bool = False,
    ) -> None:
        resolve_ema_dtype(ema_dtype, torch.float32)  # validates
        if not isinstance(async_update, bool):
            raise ValueError(f"async_update={async_update!r} must be True or False")
        self.ema_dtype = ema_dtype
        try:
            self.ema_device = None if ema_device is None else torch.device(ema_device)
        except RuntimeError as error:
            raise ValueError(f"ema_device={ema_device!r} is not a torch device: {error}") from None
        self.async_update = async_update
        self._side_stream: SideStream | None = None
        self._groups: list[FlatGroup] = []
        self._model: nn.Module | None = None  # held: its memory is the bound flat buffers anyway
        self._generation = -1
        self._pending: dict[str, torch.Tensor] | None = None  # loaded before any model was seen
        self._swapped = False
        self._module: nn.Module | None = None
        self.state_dict_keys: dict[str, str] = {}  # the model's state_dict key -> tracked name (tied: several)

    # ----------------------------------------------------------------- layout
    @property
    def swapped(self) -> bool:
        """Whether the average is in the model right now (between ``swap_in`` and ``swap_out``)."""
        return self._swapped

    def attached_model(self) -> nn.Module | None:
        """The (unwrapped) model the groups are laid out for, if it is still alive."""
        return self._model

    def attach(self, model: nn.Module) -> nn.Module:
        """Lay the groups out for ``model`` unless they are current; returns the unwrapped model."""
        model = unwrap(model)
        if self._model is model and self._current(model):
            return model
        if self._swapped:
            raise RuntimeError("the model's tensors changed while the EMA weights were swapped in; swap them out first")
        carried = self._pending if not self._groups else dict(self._iter_current())
        self._layout(model, carried)
        self._pending = None
        return model

    def _current(self, model: nn.Module) -> bool:
        if self._generation != structure_generation():
            tensors = [t for g in self._groups for t in g.tensors]
            walked = [t for _, t in tracked_tensors(model)]
            if len(walked) != len(tensors) or {id(t) for t in walked} != {id(t) for t in tensors}:
                return False
            self._generation = structure_generation()
        return all(group.intact() for group in self._groups)

    def _layout(self, model: nn.Module, carried: dict[str, torch.Tensor] | None) -> None:
        generation = structure_generation()
        named = dict(tracked_tensors(model))
        if not any(is_averaged(t) for t in named.values()):
            raise ValueError(f"{type(model).__name__} has no floating-point parameters or buffers to average")
        if carried is not None:
            carried = match_wrapped_names(carried, named)
            mismatch = describe_mismatch(carried, named, "the model") or describe_mismatch(named, carried, "the EMA")
            if mismatch is not None:
                raise ValueError(f"the model does not match the EMA's tensors: {mismatch}")
        storages = collections.Counter(storage_id(local(t)) for t in named.values())
        own_flats = {storage_id(g.model_flat) for g in self._groups if g.model_flat is not None}

        def bindable(t: torch.Tensor) -> bool:
            if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):  # DTensor shards and other subclasses
                return False
            alone = storages[storage_id(t)] == 1 or storage_id(t) in own_flats
            return alone and is_dense(t)

        keyed: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, t in named.items():
            keyed.setdefault((is_averaged(t), t.device, t.dtype, bindable(t)), []).append((name, t))
        self._groups = [
            FlatGroup.build(
                averaged,
                entries,
                ema_dtype=resolve_ema_dtype(self.ema_dtype, dtype) if averaged else dtype,
                ema_device=self.ema_device or device,
                bind=bind,
                start=carried,
            )
            for (averaged, device, dtype, bind), entries in keyed.items()
        ]
        self._model = model
        self._generation = generation
        self._module = None
        name_of = {id(t): name for name, t in named.items()}
        self.state_dict_keys = {
            key: name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in name_of
        }

    # ------------------------------------------------------------- operations
    def _settle(self) -> None:
        """Order what comes next after any update still running on the side stream."""
        if self._side_stream is not None:
            self._side_stream.wait()

    def _checked(self, model: nn.Module, action: str) -> None:
        self._settle()
        if self._swapped:
            raise RuntimeError(
                f"cannot {action}: the EMA weights are swapped into the model; "
                "leave ema_weights(...) or call get_training_model(model) first"
            )
        self.attach(model)

    @torch.no_grad()
    def update(self, model: nn.Module, weight: float) -> None:
        """``ema = ema + weight * (param - ema)`` for averaged tensors; copy the others."""
        self._checked(model, "update the EMA")
        if not self.async_update:
            for group in self._groups:
                group.update(weight)
            return
        devices = {g.tensors[0].device for g in self._groups}
        device = next(iter(devices))
        if len(devices) != 1 or device.type != "cuda":
            warnings.warn(
                f"async_update=True needs a model on one CUDA device, not {sorted(map(str, devices))}: "
                "updating synchronously",
                stacklevel=3,
            )
            self.async_update = False
            self.update(model, weight)
            return
        if self._side_stream is None:
            self._side_stream = SideStream()
        self._side_stream.run(device, lambda: [group.update(weight) for group in self._groups])

    @torch.no_grad()
    def model_is_finite(self, model: nn.Module) -> bool:
        """Whether every averaged tensor of the model is free of NaN and Inf (one read of the weights)."""
        self._checked(model, "check the model's weights")
        return all(bool(group.all_finite()) for group in self._groups if group.averaged)

    @torch.no_grad()
    def copy_from_model(self, model: nn.Module) -> None:
        """Set the average to the model's weights (the start of an EMA)."""
        self._checked(model, "reset the EMA")
        for group in self._groups:
            group.copy_from_model()

    @torch.no_grad()
    def copy_to_model(self, model: nn.Module) -> None:
        """Set the model's weights to the average (cast to the model's dtype)."""
        self._checked(model, "copy the EMA into the model")
        for group in self._groups:
            group.copy_to_model()

    def swap_in(self, model: nn.Module) -> None:
        """Put the average into the model; its training weights are parked, not copied, where dtypes agree."""
        self._checked(model, "swap the EMA weights in")
        for group in self._groups:
            group.swap_in()
        self._swapped = True

    def swap_out(self, model: nn.Module) -> None:
        """Give the model back its training weights, bit for bit."""
        if not self._swapped:
            raise RuntimeError("the EMA weights are not swapped in")
        if self._model is not unwrap(model):
            raise RuntimeError("swap_out got another model than swap_in")
        for group in self._groups:
            group.swap_out()
        self._swapped = False

    # ------------------------------------------------------------------ state
    def _iter_current(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self._groups:
            yield from group.current_ema(self._swapped)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average by the model's tensor names (copies while swapped in; empty before any model)."""
        self._settle()
        if not self._groups:
            return dict(self._pending or {})
        if self._swapped:
            return {name: t.detach().clone() for name, t in self._iter_current()}
        return {name: t.detach() for name, t in self._iter_current()}

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
        if self._swapped:
            raise RuntimeError("cannot load EMA state while the EMA weights are swapped in")
        current = dict(self._iter_current())
        state = match_wrapped_names(state, current)
        mismatch = describe_mismatch(current, state, "the loaded EMA state") or describe_mismatch(
            state, current, "the model"
        )
        if mismatch is not None:
            raise ValueError(f"EMA state does not match the model: {mismatch}")
        for name, tensor in current.items():
            tensor.copy_(state[name])

    def _gathered_module(self, model: nn.Module) -> nn.Module:
        """A plain module of the sharded ``model``'s type holding the full average, from its remembered skeleton."""
        skeleton = skeleton_of(model)
        if skeleton is None:
            raise ValueError(
                "ema_model of an FSDP-sharded model needs a copy of its structure taken before sharding (FSDP "
                "refuses deepcopy): let emakit shard it (Trainer(parallelism='fsdp')) or call "
                "emakit.tracked.remember_skeleton(model) before fully_shard; or use `with ema.ema_weights(model):` "
                "or ema.save_ema_weights(path)"
            )
        full = {name: t.full_tensor() if isinstance(t, DTensor) else t.clone() for name, t in self._iter_current()}
        return fill_tensors(skeleton, full)

    @property
    def nbytes(self) -> int:
        """Bytes held by the average."""
        return sum(g.ema_flat.untyped_storage().nbytes() for g in self._groups)

    def module(self, model: nn.Module) -> nn.Module:
        """A module of ``model``'s type whose tensors are the average's (no copy: it follows every update).

        While the EMA weights are swapped in, it holds the training weights instead. For a sharded
        (FSDP2) model it is a plain, unsharded module holding the full average, gathered at each call
        (collective: call it on every rank).
        """
        model = self.attach(model)
        if any(local(t) is not t for group in self._groups for t in group.tensors):
            return self._gathered_module(model)
        if self._module is None:
            memo: dict[int, object] = {}
            for group in self._groups:
                for tensor, view in zip(group.tensors, group.ema_views):
                    memo[id(tensor)] = (
                        nn.Parameter(view, requires_grad=False) if isinstance(tensor, nn.Parameter) else view
                    )
            self._module = copy.deepcopy(model, memo)
        return self._module
