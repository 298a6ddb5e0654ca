"""Sharded data: each rank's share of a ``DataLoader`` with a default sampler, every other setting kept.

Training uses a ``DistributedSampler`` (it pads by repeating samples so every rank runs the same number of
batches); evaluation uses :class:`EvalShardSampler`, which never repeats a sample, so summed metrics equal those
of one process over the whole set.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from emakit.distributed.environment import rank, world_size

__all__ = ["EvalShardSampler", "shard_eval_loader", "shard_train_loader"]


class EvalShardSampler(Sampler[int]):
    """Rank ``rank`` of ``num_replicas`` gets samples ``rank, rank + num_replicas, ...``: every sample exactly once.

    Unlike ``DistributedSampler`` it never pads with repeated samples, so ranks may get one sample (and one batch)
    fewer; metrics summed over ranks are those of the whole dataset.
    """

    def __init__(self, length: int, rank: int, num_replicas: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.length, self.rank, self.num_replicas = length, rank, num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def _default_sampler(loader: Any) -> Sampler | None:
    """The loader's sampler when emakit may replace it: a plain DataLoader batching a default sampler."""
    if type(loader) is not DataLoader or type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.sampler
    if type(sampler) is SequentialSampler:
        return sampler
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        return sampler
    return None


def _rebuild(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """``loader`` with ``sampler``, every other setting kept."""
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "sampler": sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor if loader.num_workers > 0 else None,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": getattr(loader, "in_order", True),
    }
    accepted = inspect.signature(DataLoader.__init__).parameters
    return DataLoader(loader.dataset, **{k: v for k, v in kwargs.items() if k in accepted})


def _warn_not_sharded(loader: Iterable, what: str) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, (DistributedSampler, EvalShardSampler)):  # already split among the ranks
        return
    described = type(sampler).__name__ if sampler is not None else type(loader).__name__
    warnings.warn(
        f"{what} ({described}) is not a DataLoader with a default sampler, so emakit does not shard it: every "
        f"rank sees all it yields. Give it a DistributedSampler (rank={rank()}, num_replicas={world_size()}) "
        "to split the data",
        stacklevel=3,
    )


def shard_train_loader(loader: Iterable, seed: int) -> Iterable:
    """``loader`` with a ``DistributedSampler`` in place of its default sampler (itself in one process).

    Shuffling stays on or off; the shuffled order of epoch ``e`` is the permutation seeded with ``seed + e``
    (the trainer calls ``set_epoch`` each epoch), so with one rank it is the ``RandomSampler`` order the
    trainer uses. The sampler pads by repeating samples so every rank runs the same number of batches.
    """
    if world_size() <= 1:
        return loader
    sampler = _default_sampler(loader)
    if sampler is None or not isinstance(loader, DataLoader):  # a DataLoader where there is a sampler
        _warn_not_sharded(loader, "train_dataloader")
        return loader
    shuffle = isinstance(sampler, RandomSampler)
    size, world = len(loader.dataset), world_size()  # type: ignore[arg-type]  # torch's Dataset declares no __len__
    if size % world:
        warnings.warn(
            f"the training set's {size} samples do not divide among {world} ranks: each epoch the "
            f"DistributedSampler repeats {world - size % world} of them so that every rank runs as many batches",
            stacklevel=3,
        )
    distributed: DistributedSampler[int] = DistributedSampler(
        loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=False
    )
    return _rebuild(loader, distributed)


def shard_eval_loader(loader: Iterable | None) -> Iterable | None:
    """``loader`` with an :class:`EvalShardSampler` in place of its default sampler (itself in one process)."""
    if loader is None or world_size() <= 1:
        return loader
    sampler = _default_sampler(loader)
    if sampler is None or not isinstance(loader, DataLoader):  # a DataLoader where there is a sampler
        _warn_not_sharded(loader, "eval_dataloader")
        return loader
    return _rebuild(loader, EvalShardSampler(len(loader.dataset), rank(), world_size()))  # type: ignore[arg-type]
