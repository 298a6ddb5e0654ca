"""Multi-process training on ``torch.distributed``: the torchrun environment, wrapping, sharded data, reductions.

Launch a script that builds an :class:`~emakit.Trainer` with ``torchrun --nproc_per_node N script.py``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables) for every process, and the trainer calls
:func:`initialize`, :func:`wrap_model`, :func:`shard_train_loader` and :func:`shard_eval_loader` from here. Each
helper is also usable by hand, in any loop.

- Process group: ``nccl`` for CUDA devices, ``gloo`` for the CPU, with a timeout (``EMAKIT_DIST_TIMEOUT`` seconds,
  default 300) so that when a rank fails or hangs the others raise instead of waiting forever.
- ``parallelism``: ``"ddp"`` (:class:`~torch.nn.parallel.DistributedDataParallel`), ``"fsdp"`` (FSDP2,
  :func:`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all ranks: every submodule that owns
  parameters is one unit, then the root), or ``None``: DDP when the world size is above 1, unless the model is
  already wrapped by the user. With world size 1 every choice is a no-op.
- Data: a ``DataLoader`` with a default sampler (sequential or random) is rebuilt with a sampler that gives each
  rank its share, keeping every other setting. Training uses a ``DistributedSampler`` (it pads by repeating samples
  so every rank runs the same number of batches); evaluation uses :class:`EvalShardSampler`, which never repeats a
  sample, so summed metrics equal those of one process over the whole set.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import inspect
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

__all__ = [
    "FSDP_ON_CPU_SINCE",
    "PARALLELISMS",
    "TORCH_VERSION",
    "CollectiveError",
    "EvalShardSampler",
    "all_reduce_sums",
    "barrier",
    "check_fsdp_device",
    "check_parallelism",
    "check_wrapping",
    "default_device",
    "explain_failures",
    "forward_module",
    "from_rank0",
    "initialize",
    "is_main",
    "local_rank",
    "max_over_ranks",
    "rank",
    "repoint_optimizers",
    "shard_eval_loader",
    "shard_train_loader",
    "sum_over_ranks",
    "timeout_seconds",
    "world_size",
    "wrap_model",
    "wrapper_kind",
]

PARALLELISMS = (None, "ddp", "fsdp")
_DEFAULT_TIMEOUT_S = 300.0
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])  # (major, minor)
FSDP_ON_CPU_SINCE = (2, 9)  # before: no CPU support (2.6), or gloo sums gradients instead of averaging (2.7, 2.8)
_meshes: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # the DeviceMeshes _fully_shard made


# ------------------------------------------------------------------ environment
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def world_size() -> int:
    """The number of processes: the process group's size, else ``WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global rank: the process group's, else ``RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, 0 when unset): the index of its GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this is rank 0, the process that prints, shows progress and writes files."""
    return rank() == 0


def timeout_seconds() -> float:
    """How long a collective may wait for the other ranks: ``EMAKIT_DIST_TIMEOUT`` seconds, default 300."""
    value = os.environ.get("EMAKIT_DIST_TIMEOUT")
    if value is None or value == "":
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"EMAKIT_DIST_TIMEOUT={value!r} must be a positive number of seconds")
    return seconds


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available (``cuda`` in one process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if world_size() > 1 else torch.device("cuda")


def initialize(device: torch.device) -> bool:
    """Start the default process group when ``WORLD_SIZE`` > 1 and none is running; True when this call started it.

    The backend is ``nccl`` for a CUDA ``device`` (which becomes this process's current device), ``gloo``
    otherwise; collectives time out after :func:`timeout_seconds`. The group is destroyed when the process exits.
    """
    if world_size() <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size()} but this torch build has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size()} but {missing} are not set: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node N script.py)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    """Destroy the process group while the interpreter is whole (at exit), so its backend's threads are joined.

    A gloo worker thread that finished a collective may still hold its tensors; releasing them takes the GIL, and a
    thread that waits for the GIL once the interpreter finalizes aborts the process ("terminate called without an
    active exception"). The backend joins its threads when the group is freed, which ``destroy_process_group`` does
    only if nothing else holds the group. Under FSDP2 two things do: sharded modules of finished runs (reference
    cycles, until a collection), and the device meshes (a mesh keeps its groups; DTensor's caches keep the mesh).
    """
    if not dist.is_initialized():
        return
    if TORCH_VERSION < (
        2,
        8,
    ):  # gloo's destructor holds the GIL while joining a worker that waits for it (fixed in 2.8)
        with contextlib.suppress(Exception):
            dist.barrier()  # every rank's last collective is finished before the group goes
    dist.destroy_process_group()
    gc.collect()
    for mesh in list(_meshes.values()):
        groups = getattr(mesh, "_pg_registry", None)  # the mesh's references to its groups (recent torch)
        if isinstance(groups, dict):
            groups.clear()
    _meshes.clear()


class CollectiveError(RuntimeError):
    """Waiting for the other ranks failed: one of them crashed, hangs, or is unreachable."""


_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL")


@contextlib.contextmanager
def explain_failures() -> Iterator[None]:
    """Re-raise a failed or timed-out collective as a :class:`CollectiveError` that says what probably happened."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        failed = isinstance(error, dist.DistError) or any(s in str(error) for s in _COLLECTIVE_FAILURES)
        if world_size() <= 1 or not failed:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: waiting for the other ranks failed ({first}). Another rank "
            f"probably crashed or hangs: see its output. Collectives time out after {timeout_seconds():g} s "
            "(set EMAKIT_DIST_TIMEOUT to change it)"
        ) from error


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------- models
def check_parallelism(parallelism: str | None) -> str | None:
    """``parallelism`` itself when it is one of :data:`PARALLELISMS`, else ValueError."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism={parallelism!r} is not supported: use one of {PARALLELISMS}")
    return parallelism


def check_fsdp_device(device: torch.device) -> None:
    """ValueError where FSDP2 would train the wrong model: on the CPU (gloo) before torch 2.9.

    torch 2.6 has no CPU support in FSDP2; 2.7 and 2.8 sum the gradients of the ranks over gloo
    instead of averaging them (pytorch/pytorch#162338), with no error.
    """
    if device.type == "cpu" and TORCH_VERSION < FSDP_ON_CPU_SINCE:
        raise ValueError(
            f"FSDP2 on the CPU (gloo) needs torch >= {'.'.join(map(str, FSDP_ON_CPU_SINCE))}: torch "
            f"{torch.__version__} has no CPU support or sums the ranks' gradients instead of averaging them, "
            "training the wrong model; use parallelism='ddp', CUDA devices, or a newer torch"
        )


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def wrapper_kind(model: nn.Module) -> str | None:
    """``"ddp"`` or ``"fsdp"`` when the user already wrapped ``model`` (or FSDP-sharded any submodule), else None."""
    inner = model._modules.get("_orig_mod", model)  # under torch.compile
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return "ddp"
    if any(_is_fsdp(module) for module in inner.modules()):
        return "fsdp"
    return None


def forward_module(model: nn.Module) -> nn.Module:
    """The module to call for evaluation: ``model`` without a DDP wrapper (whose forward may run collectives)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: every submodule owning parameters becomes a unit (innermost first), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    _meshes[id(mesh)] = mesh  # its hold on the process group is dropped at exit (_destroy)
    for module in reversed(list(model.modules())):  # reversed pre-order: children before their parents
        if module is not model and next(module.parameters(recurse=False), None) is not None:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def check_wrapping(model: nn.Module, parallelism: str | None) -> str | None:
    """What the user wrapped ``model`` in (see :func:`wrapper_kind`); ValueError when ``parallelism`` asks for more."""
    check_parallelism(parallelism)
    kind = wrapper_kind(model)
    if kind is not None and parallelism is not None:
        raise ValueError(
            f"the model is already wrapped for {kind.upper()} ({type(model).__name__}) and parallelism="
            f"{parallelism!r} asks emakit to wrap it again: pass the plain model with parallelism={parallelism!r}, "
            "or your wrapped model with parallelism=None"
        )
    return kind


def wrap_model(model: nn.Module, parallelism: str | None, device: torch.device) -> nn.Module:
    """Prepare ``model`` (already on ``device``) for this world; returns the module to call for training.

    One process: ``model``. A model the user wrapped (DDP, FSDP) with ``parallelism=None``: ``model`` as it is.
    ``"ddp"`` (and ``None``): a ``DistributedDataParallel`` around ``model``. ``"fsdp"``: ``model`` itself, sharded
    in place by ``fully_shard`` (its parameters become DTensors: build optimizers afterwards, or let the trainer
    re-point them). Raises ValueError for an unknown ``parallelism`` or a user-wrapped model with ``parallelism``.
    """
    kind = check_wrapping(model, parallelism)
    if world_size() <= 1 or kind is not None:
        return model
    if parallelism == "fsdp":
        _fully_shard(model, device)
        return model
    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if (device.type == "cuda") else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def repoint_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], before: dict[str, nn.Parameter], model: nn.Module
) -> None:
    """Point optimizers built on ``model``'s parameters ``before`` FSDP replaced them at the new ones, by name.

    Raises ValueError for an optimizer that already has state (it would be of the unsharded parameters) or
    that holds a parameter that is not the model's.
    """
    after = dict(model.named_parameters())
    current = {id(param) for param in after.values()}
    new_of = {id(param): after[name] for name, param in before.items() if name in after}
    for index, optimizer in enumerate(optimizers):
        if optimizer.state:
            raise ValueError(
                f"optimizers[{index}] already has state; with parallelism='fsdp' build optimizers before any "
                "step, or pass optimizers=None for the default"
            )
        for group in optimizer.param_groups:
            params = group["params"]
            if all(id(param) in current for param in params):
                continue
            unknown = [p for p in params if id(p) not in new_of]
            if unknown:
                raise ValueError(
                    f"optimizers[{index}] holds a parameter of shape {tuple(unknown[0].shape)} that is not one of "
                    "the model's: with parallelism='fsdp' optimizers may hold only the model's parameters"
                )
            group["params"] = [new_of[id(param)] for param in params]


# ------------------------------------------------------------------------- data
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
    if sampler is None:
        _warn_not_sharded(loader, "train_dataloader")
        return loader
    shuffle = isinstance(sampler, RandomSampler)
    size, world = len(loader.dataset), world_size()
    if size % world:
        warnings.warn(
            f"the training set's {size} samples do not divide among {world} ranks: each epoch the "
            f"DistributedSampler repeats {world - size % world} of them so that every rank runs as many batches",
            stacklevel=3,
        )
    distributed = DistributedSampler(
        loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=False
    )
    return _rebuild(loader, distributed)


def shard_eval_loader(loader: Iterable | None) -> Iterable | None:
    """``loader`` with an :class:`EvalShardSampler` in place of its default sampler (itself in one process)."""
    if loader is None or world_size() <= 1:
        return loader
    sampler = _default_sampler(loader)
    if sampler is None:
        _warn_not_sharded(loader, "eval_dataloader")
        return loader
    return _rebuild(loader, EvalShardSampler(len(loader.dataset), rank(), world_size()))


# ------------------------------------------------------------------- reductions
def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable Python value; ``value`` itself in one process)."""
    if world_size() <= 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over all ranks (float64; ``values`` itself in one process)."""
    if world_size() <= 1 or not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    if world_size() <= 1 or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sums(totals: dict[str, list[float]], device: torch.device) -> dict[str, list[float]]:
    """``{name: [total, count]}`` summed over all ranks, by name (a rank may lack names: it had no batches)."""
    if world_size() <= 1 or not dist.is_initialized():
        return totals
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(totals))
    names = sorted({name for names in gathered for name in names or ()})
    flat = [value for name in names for value in totals.get(name, [0.0, 0])]
    summed = sum_over_ranks(flat, device)
    return {name: [summed[2 * i], summed[2 * i + 1]] for i, name in enumerate(names)}
