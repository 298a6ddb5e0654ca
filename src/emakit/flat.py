"""One group of an EMA: a model's tensors of one (kind, device, dtype) in a flat buffer, and their average.

Per group, with ``w = 1 - smoothing``::

    update:    ema_flat.lerp_(model_flat, w)          one kernel over all tensors: the bandwidth roofline
    swap in:   exchange the two buffers' memory       O(1): the storages trade data pointers
    swap out:  exchange it back                       the training weights, bit for bit

When the average's dtype or device differs from the model's, swap-in parks the training
weights in a fresh buffer by the same exchange and cast-copies the average in. Tensors that
cannot be bound stay *loose* and go through ``torch._foreach_lerp_``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

__all__ = ["ALIGN_BYTES", "FlatGroup", "flat_views", "is_dense", "like_model", "local", "storage_id", "use_count"]

ALIGN_BYTES = 64  # each tensor starts on a 64-byte boundary of its flat buffer
_CAST_CHUNK = 1 << 22  # elements per cast-and-lerp step when dtypes differ: bounds the temporary


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: guarded


def use_count(tensor: torch.Tensor) -> int | None:
    """How many tensors share ``tensor``'s storage (None where torch does not tell)."""
    return None if _storage_use_count is None else _storage_use_count(tensor.untyped_storage()._cdata)


def storage_id(tensor: torch.Tensor) -> int:
    """An identity of ``tensor``'s storage, the same for all its views, unchanged by data-pointer exchanges."""
    return tensor.untyped_storage()._cdata


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's data of ``tensor``: the local shard of a DTensor (FSDP2), else the tensor itself."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def like_model(model_tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (local data) presented like ``model_tensor``: a DTensor with its mesh and placements, or as is."""
    if not isinstance(model_tensor, DTensor):
        return value
    return DTensor.from_local(
        value,
        model_tensor.device_mesh,
        model_tensor.placements,
        run_check=False,
        shape=model_tensor.shape,
        stride=model_tensor.stride(),
    )


_HAS_POINTER_EXCHANGE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def _exchange_data(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the memory behind the storages of ``a`` and ``b`` (equal size): views follow, nothing moves."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if _HAS_POINTER_EXCHANGE:
        sa._swap_data_ptr_(sb)  # checks itself that both storages are alike
    else:  # torch without the pointer exchange: three copies, same result
        parked = a.clone()
        a.copy_(b)
        b.copy_(parked)


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements of its storage, in any dim order."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _cast_lerp_(ema: torch.Tensor, source: torch.Tensor, weight: float) -> None:
    """``ema.lerp_(source, weight)`` for flat tensors, casting ``source`` to ``ema``'s dtype and device."""
    if source.dtype == ema.dtype and source.device == ema.device:
        ema.lerp_(source, weight)
        return
    for start in range(0, ema.numel(), _CAST_CHUNK):
        stop = start + _CAST_CHUNK
        ema[start:stop].lerp_(source[start:stop].to(device=ema.device, dtype=ema.dtype), weight)


def flat_views(flat: torch.Tensor, like: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``, at ``offsets``; in their memory format where they are dense."""
    return [
        flat.as_strided(t.shape, t.stride() if is_dense(t) else torch.empty(t.shape, device="meta").stride(), o)
        for t, o in zip(like, offsets)
    ]


def _aligned_offsets(tensors: list[torch.Tensor], step: int) -> tuple[list[int], int]:
    """Offsets that start each tensor on a multiple of ``step`` elements, and the total length."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // step) * step
    return offsets, total


@dataclass
class FlatGroup:
    """The model's tensors of one (kind, device, dtype) and their average."""

    averaged: bool
    names: list[str]
    tensors: list[torch.Tensor]  # the model's own Parameter and buffer objects
    ema_flat: torch.Tensor
    ema_views: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)
    model_flat: torch.Tensor | None = None  # None: the tensors are loose, not bound
    use_count: int | None = None
    parked: list[torch.Tensor] | torch.Tensor | None = None  # training weights during a swap
    staging: torch.Tensor | None = None  # pinned host copy of model_flat, for an average kept on the CPU
    exchangeable: bool = False  # bound, with the average's dtype and device: swaps exchange memory

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        averaged: bool,
        named: list[tuple[str, torch.Tensor]],
        ema_dtype: torch.dtype,
        ema_device: torch.device,
        bind: bool,
        start: dict[str, torch.Tensor] | None,
    ) -> FlatGroup:
        """Allocate the average (from ``start`` by name, else from the tensors); bind the tensors if ``bind``."""
        names = [name for name, _ in named]
        tensors = [t for _, t in named]
        data = [local(t) for t in tensors]  # what this process holds: a shard of a DTensor
        dtype, device = tensors[0].dtype, tensors[0].device
        widest = max(torch.empty((), dtype=d).element_size() for d in (dtype, ema_dtype))
        offsets, total = _aligned_offsets(data, max(1, ALIGN_BYTES // widest))
        pin = ema_device.type == "cpu" and device.type == "cuda"
        ema_flat = torch.zeros(total, dtype=ema_dtype, device=ema_device, pin_memory=pin)
        group = cls(averaged, names, tensors, ema_flat, flat_views(ema_flat, data, offsets), offsets)
        for name, view, t in zip(names, group.ema_views, data):
            view.copy_(local(start[name]) if start is not None else t)
        if bind:
            group.model_flat = torch.zeros(total, dtype=dtype, device=device)
            for t, view in zip(tensors, flat_views(group.model_flat, tensors, offsets)):
                view.copy_(t)
                t.data = view  # the Parameter object stays; its memory is now a slice of model_flat
            group.use_count = use_count(group.model_flat)
            group.exchangeable = dtype == ema_dtype and device == ema_device
            if pin:
                group.staging = torch.empty(total, dtype=dtype, pin_memory=True)
        return group

    def intact(self) -> bool:
        """Whether the model's tensors are still where the group expects them."""
        if self.model_flat is None:
            first = self.tensors[0]
            return all(t.dtype == first.dtype and t.device == first.device for t in self.tensors)
        count = use_count(self.model_flat)
        if count is not None and count == self.use_count:
            return True
        storage = storage_id(self.model_flat)
        if all(storage_id(t) == storage and t.storage_offset() == o for t, o in zip(self.tensors, self.offsets)):
            self.use_count = use_count(self.model_flat)
            return True
        return False

    def all_finite(self) -> torch.Tensor:
        """Whether no tensor of the model holds NaN or Inf (a bool tensor on the model's device)."""
        if self.model_flat is not None:
            return torch.isfinite(self.model_flat).all()
        return torch.stack([torch.isfinite(local(t)).all() for t in self.tensors]).all()

    def update(self, weight: float) -> None:
        if not self.averaged:
            self.copy_from_model()
        elif self.staging is not None:  # average on the host: one bulk transfer, then lerp there
            self.staging.copy_(self.model_flat, non_blocking=True)
            torch.cuda.current_stream(self.model_flat.device).synchronize()
            _cast_lerp_(self.ema_flat, self.staging, weight)
        elif self.model_flat is not None:
            _cast_lerp_(self.ema_flat, self.model_flat, weight)
        else:
            sources = [
                local(t).detach().to(device=self.ema_flat.device, dtype=self.ema_flat.dtype) for t in self.tensors
            ]
            torch._foreach_lerp_(self.ema_views, sources, weight)

    def copy_from_model(self) -> None:
        if self.model_flat is not None:
            self.ema_flat.copy_(self.model_flat)
        else:
            for view, tensor in zip(self.ema_views, self.tensors):
                view.copy_(local(tensor))

    def copy_to_model(self) -> None:
        if self.model_flat is not None:
            self.model_flat.copy_(self.ema_flat)
        else:
            for view, tensor in zip(self.ema_views, self.tensors):
                local(tensor).copy_(view)

    def swap_in(self) -> None:
        if self.exchangeable:
            _exchange_data(self.model_flat, self.ema_flat)
        elif self.model_flat is not None:
            self.parked = torch.empty_like(self.model_flat)
            _exchange_data(self.model_flat, self.parked)
            self.model_flat.copy_(self.ema_flat)
        else:
            self.parked = [local(t).detach().clone() for t in self.tensors]
            with torch.no_grad():
                self.copy_to_model()

    def swap_out(self) -> None:
        if self.exchangeable:
            _exchange_data(self.model_flat, self.ema_flat)
        elif self.model_flat is not None:
            _exchange_data(self.model_flat, self.parked)
        else:
            with torch.no_grad():
                for tensor, parked in zip(self.tensors, self.parked):
                    local(tensor).copy_(parked)
        self.parked = None

    def current_ema(self, swapped: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` holding the average now: in the model's tensors while exchanged in."""
        holders = self.tensors if swapped and self.exchangeable else self.ema_views
        for name, tensor, holder in zip(self.names, self.tensors, holders):
            yield name, like_model(tensor, holder)
