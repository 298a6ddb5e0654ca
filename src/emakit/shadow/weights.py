"""The class that holds one average: its arguments, the check before each use, updates and copies.

The layout, the asynchronous path, the swaps and the state are the mixins beside this module
(see :mod:`emakit.shadow`); this class brings them together over one set of attributes.
"""

from __future__ import annotations

import torch
from torch import nn

from emakit.shadow.asynchronous import AsynchronousUpdates
from emakit.shadow.layout import UNKNOWN, ShadowLayout, Unknown, resolve_ema_dtype
from emakit.shadow.state import ShadowState
from emakit.shadow.swaps import Swaps, has_swaps
from emakit.side_stream import CUDA, SideStream, StreamOps
from emakit.storage import Group
from emakit.tracked import EVERYTHING, Selection, TrackedTensors

__all__ = ["ShadowWeights"]


class ShadowWeights(ShadowLayout, AsynchronousUpdates, Swaps, ShadowState):
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
        flatten_model: bool = False,
        selection: Selection = EVERYTHING,
        stream_ops: StreamOps = CUDA,
        shard_over_ranks: bool = False,
    ) -> None:
        resolve_ema_dtype(ema_dtype, torch.float32)  # validates
        for name, flag in (
            ("async_update", async_update),
            ("flatten_model", flatten_model),
            ("shard_over_ranks", shard_over_ranks),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False")
        if flatten_model and shard_over_ranks:
            raise ValueError(
                "flatten_model=True and shard_over_ranks=True do not go together: flatten_model's swaps exchange the "
                "model's memory with a whole average, which no rank holds under shard_over_ranks; choose one"
            )
        self.shard_over_ranks = shard_over_ranks
        self.ema_dtype = ema_dtype
        try:
            self.ema_device = None if ema_device is None else torch.device(ema_device)
        except RuntimeError as error:
            raise ValueError(f"ema_device={ema_device!r} is not a torch device: {error}") from None
        self.async_update = async_update
        self.flatten_model = flatten_model
        self.selection = selection
        self._stream_ops = stream_ops  # the device calls of asynchronous updates (CUDA's)
        self._side_stream: SideStream | None = None
        self._generation = 0  # counts the layouts and followed changes of the model's tensors
        self._streamed = -1  # the generation whose memory the side stream was told of
        self._groups: list[Group] = []
        self._model: nn.Module | None = None  # the model the groups are laid out for (held: ema_model needs it)
        self._tracked: TrackedTensors | None = None  # its tensors, and the check that they are current
        self._key: dict[str, tuple] = {}  # per tracked name: what must stay the same to keep the layout
        self._pending: dict[str, torch.Tensor] | None = None  # loaded before any model was seen
        self._pending_partitioning: dict | Unknown | None = UNKNOWN  # whose ZeRO-3 partitions it holds, if it says
        self._skeleton: nn.Module | None = None  # a weightless copy of the model, for ema_model under FSDP
        self._snapshot: nn.Module | None = None  # ema_model: a copy of the average, until the average changes
        self.state_dict_keys: dict[str, str] = {}  # the model's state_dict key -> tracked name (tied: several)

    # ------------------------------------------------------------- operations
    def _checked(self, model: nn.Module, action: str) -> None:
        self._settle()
        if self.swapped or has_swaps(model):
            raise RuntimeError(
                f"cannot {action}: EMA weights are swapped into the model; "
                "leave ema_weights(...) or call get_training_model(model) first"
            )
        self.attach(model)

    def groups_for_update(self, model: nn.Module) -> list[Group]:
        """The groups an update of ``model`` writes, after the check before each use (for updates made from outside,
        :func:`emakit.shadow.together.update_together`): the caller updates every one of them."""
        self._checked(model, "update the EMA")
        self._snapshot = None
        return self._groups

    @torch.no_grad()
    def update(self, model: nn.Module, weight: float) -> None:
        """``ema = ema + weight * (param - ema)`` for averaged tensors; copy the others."""
        self.groups_for_update(model)
        if self.async_update and self._asynchronous_device() is not None:
            self._update_asynchronously(weight)
            return
        for group in self._groups:
            group.update(weight)

    @torch.no_grad()
    def model_is_finite(self, model: nn.Module) -> bool:
        """Whether every averaged tensor of the model is free of NaN and Inf (one read of the weights)."""
        self._checked(model, "check the model's weights")
        return all(bool(group.all_finite()) for group in self._groups if group.kind != "copied")

    @torch.no_grad()
    def copy_from_model(self, model: nn.Module) -> None:
        """Set the average to the model's weights (the start of an EMA)."""
        self._checked(model, "reset the EMA")
        self._snapshot = None
        for group in self._groups:
            group.copy_from_model()

    @torch.no_grad()
    def set_to_mean(self, others: list[ShadowWeights], model: nn.Module) -> None:
        """Set the average to the mean of ``others``' (averages of the same ``model``): ``(a_1 + ... + a_k) / k``,
        accumulated in float32 at least; copied tensors (integer buffers) take the last one's. A windowed average
        combines its blocks with it (:mod:`emakit.ema.window`)."""
        if not others:
            raise ValueError("set_to_mean needs at least one average")
        self._checked(model, "combine averages")
        for other in others:  # laid out as this one for the same model: only their averages are read, no check
            other._settle()
            if other.attached_model() is not self.attached_model() or other._key != self._key:
                other._checked(model, "combine averages")
        layouts = {tuple(tuple(group.names) for group in shadow._groups) for shadow in (self, *others)}
        if len(layouts) != 1:
            raise RuntimeError("set_to_mean: the averages are laid out differently; they must follow one model")
        self._snapshot = None
        for index, group in enumerate(self._groups):
            group.set_to_mean([other._groups[index] for other in others])

    @torch.no_grad()
    def copy_to_model(self, model: nn.Module) -> None:
        """Set the model's weights to the average (cast to the model's dtype)."""
        self._checked(model, "copy the EMA into the model")
        for group in self._groups:  # every group before any writes
            group.check_writable()
        for group in self._groups:
            group.copy_to_model()

    @property
    def nbytes(self) -> int:
        """Bytes held by the average."""
        return sum(group.nbytes for group in self._groups)
