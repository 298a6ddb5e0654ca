"""The state of an :class:`~emakit.EMA`: what a checkpoint holds to resume it exactly, and the check on load.

A state holds the averages, their counters and clock, and the rates they were made with: a state saved with
other rates (half-lives or smoothings, update interval, warmup) is refused by name, since resuming it would
silently continue another average (``strict=False`` continues with a warning). Under DeepSpeed ZeRO-3 it holds
this rank's partitions and says whose (``partitioning``): it resumes on the same rank of the same world size
only; another rank's or world size's is refused, naming both. A state of whole tensors (``state_dict(whole=True)``,
or one saved unsharded) loads anywhere: each rank keeps its part.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from emakit.distributed.per_rank import gather_states, own_state
from emakit.ema.averages import Averages
from emakit.ema.window import Window
from emakit.shadow import ShadowWeights
from emakit.storage.ranks import ranks
from emakit.time import Time

__all__ = ["EMAState"]

_STATE_VERSION = 1


class EMAState:
    """:class:`~emakit.EMA`'s :meth:`state_dict` and :meth:`load_state_dict`."""

    shadows: list[ShadowWeights]
    shadow: ShadowWeights
    half_lives: tuple[Time, ...] | None
    smoothings: tuple[float, ...] | None
    smoothing: float | None
    update_interval: Time
    warmup: tuple | None
    min_smoothing: float
    started: bool
    num_updates: int
    batches_seen: int
    num_skipped: int
    last_smoothing: float | None
    schedules: tuple[Callable[[int], float], ...] | None
    last_scheduled: tuple[int, tuple[float, ...]] | None
    labels: property
    exponential_labels: property
    shard_over_ranks: bool
    averages: Averages
    _windows: dict[int, Window]

    # ------------------------------------------------------------------ state
    def state_dict(self, whole: bool = False) -> dict[str, Any]:
        """What a checkpoint holds to resume this EMA exactly: the averages, their counters and clock, the rates.

        By default each rank's state holds its own data of the averages (FSDP2 shards as DTensors, ZeRO-3
        partitions): save it per rank, or through ``torch.distributed.checkpoint``. ``whole=True`` gathers sharded
        averages to rank 0, one tensor at a time (collective: every rank calls), for a checkpoint that rank 0 writes
        alone: rank 0's state then holds whole tensors (the other ranks' hold none) and loads on every rank, each
        keeping its own part.
        """
        weights = [shadow.whole_state_dict() if whole else shadow.state_dict() for shadow in self.shadows]
        return {
            "version": _STATE_VERSION,
            "smoothing": self.smoothing,
            **self.state_dict_rates(),
            "started": self.started,
            "num_updates": self.num_updates,
            "batches_seen": self.batches_seen,
            "num_skipped": self.num_skipped,
            "last_smoothing": self.last_smoothing,
            # a schedule is saved by its values: the step and smoothings of the last update (checked on load)
            "schedule_at": None
            if self.last_scheduled is None
            else [self.last_scheduled[0], list(self.last_scheduled[1])],
            "weights": weights[0],  # the first average
            "more_weights": weights[1:],  # the others, in order
            "state_dict_keys": dict(self.shadow.state_dict_keys),
            "partitioning": None if whole else self.shadow.partitioning(),  # ZeRO-3: whose partitions it holds
            "window_states": [window.state_dict(whole) for window in self._windows.values()],  # their blocks
        }

    def checkpoint_state(self) -> dict[str, Any] | None:
        """:meth:`state_dict` for a checkpoint that one rank writes for all (DDP, Lightning's DDP strategies): with
        ``shard_over_ranks`` on several ranks, every rank's slice gathered to rank 0 as ``{"per_rank_states":
        [rank 0's, ...]}`` (collective: call it on every rank; None on the others); else :meth:`state_dict` (ZeRO-3
        partitions too: DeepSpeed writes a checkpoint on every rank, each holding its own). :meth:`load_state_dict`
        takes either and picks this rank's.

        Example (a callback's state, saved by rank 0)::

            >>> state = {"ema": ema.checkpoint_state()}
            >>> ema.load_state_dict(state["ema"])        # on every rank, resuming on as many ranks
        """
        if getattr(self, "shard_over_ranks", False) and ranks() is not None:
            return gather_states(self.state_dict())
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from ``state`` (as :meth:`state_dict` gave it): the averages, their counters and clock.

        The state must come from an EMA with the same rates (half-lives or smoothings, update interval,
        warmup): resuming with other ones would silently continue another average. ``strict=False``
        continues with this EMA's rates instead, with a warning. Every rank's states (:meth:`checkpoint_state`):
        this rank's is loaded, on as many ranks as saved them (else refused, naming both).
        """
        state = own_state(state)
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"EMA state has version {found!r}; this emakit reads version {_STATE_VERSION}")
        missing = {"started", "num_updates", "batches_seen", "weights"} - state.keys()
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)}")
        if state["started"] and not state["weights"]:
            raise ValueError("EMA state says the average started but holds no weights")
        more = state.get("more_weights", [])
        if len(more) != len(self.shadows) - 1:
            raise ValueError(f"EMA state holds {1 + len(more)} averages; this EMA keeps {len(self.shadows)}")
        differences = self._rate_differences(state)
        if differences and strict:
            raise ValueError(
                f"EMA state was saved with other rates ({'; '.join(differences)}): build the EMA with the saved "
                "ones to resume, or load with strict=False to continue these weights at the new rates"
            )
        if differences:
            warnings.warn(f"EMA: continuing a state saved with other rates ({'; '.join(differences)})", stacklevel=2)
        for shadow, weights in zip(self.shadows, [state["weights"], *more]):
            shadow.load_state_dict(weights, partitioning=state.get("partitioning"))  # other ranks' are refused
            if shadow.attached_model() is None:
                shadow.state_dict_keys = dict(state.get("state_dict_keys") or {})
        windows = state.get("window_states", [])
        if len(windows) != len(self._windows):
            raise ValueError(f"EMA state holds {len(windows)} windows' blocks; this EMA keeps {len(self._windows)}")
        for window, blocks in zip(self._windows.values(), windows):
            window.load_state_dict(blocks, partitioning=state.get("partitioning"))
        self.started = bool(state["started"])
        self.num_updates = int(state["num_updates"])
        self.batches_seen = int(state["batches_seen"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.last_smoothing = state.get("last_smoothing")
        at = state.get("schedule_at")
        self.last_scheduled = None if at is None else (int(at[0]), tuple(at[1]))

    def _rate_differences(self, state: dict[str, Any]) -> list[str]:
        """What of the rates in ``state`` differs from this EMA's (entries a state lacks are not compared)."""
        mine = self.state_dict_rates()
        if state.get("half_lives") is not None and mine["half_lives"] is not None:
            mine.pop("smoothings")  # half-lives in 'dur' get their smoothing only once the run's length is known
        elif state.get("smoothings") is None and self.smoothing is not None:
            mine = {"smoothing": self.smoothing, **mine}  # a state from before 'smoothings' was saved
        differences = [
            f"{key} {state[key]!r} saved, {value!r} here"
            for key, value in mine.items()
            if key in state and state[key] != value and value is not None
        ]
        at = state.get("schedule_at")
        if self.schedules is not None and at is not None:  # the schedule must give the saved smoothings again
            here = [float(schedule(int(at[0]))) for schedule in self.schedules]
            if here != list(at[1]):
                differences.append(f"the schedule gave {list(at[1])} at step {at[0]}, gives {here} here")
        return differences

    def state_dict_rates(self) -> dict[str, Any]:
        """The entries of :meth:`state_dict` that say how the average moves."""
        return {
            "schedules": None if self.schedules is None else list(self.exponential_labels),
            "half_lives": None if self.half_lives is None else [str(h) for h in self.half_lives],
            "smoothings": None if self.smoothings is None else list(self.smoothings),
            "update_interval": str(self.update_interval),
            "warmup": _warmup_state(self.warmup),
            "min_smoothing": self.min_smoothing,
            "averages": list(self.averages.kinds),
            "windows": [str(window) for window in self.averages.windows],
            "window_blocks": self.averages.window_blocks,
        }


def _warmup_state(warmup: tuple | None) -> str | list | None:
    """A warmup as the user spells it, in plain values: ``"tf"``, ``["power", 1.0, 0.75]`` or None."""
    if warmup is None:
        return None
    return warmup[0] if len(warmup) == 1 else list(warmup)
