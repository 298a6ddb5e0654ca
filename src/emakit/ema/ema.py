"""EMA by hand: when to start and update an exponential moving average of the weights.

Storage, arithmetic and swaps live in :class:`emakit.shadow.ShadowWeights`; this module
decides *when*. Each update event (an optimizer step for ``ba`` units: :meth:`EMA.update`; a
trainer's batch or epoch end: :meth:`EMA.update_at`) whose count is a multiple of
``update_interval`` and at or after ``ema_start``::

    first event:  ema = param                                   (the average starts at the weights)
    later events: ema = smoothing * ema + (1 - smoothing) * param
                  smoothing = 2 ** (-(update_interval / half_life))

With ``train_with_ema_weights=True`` the training weights are then set to ``ema``. The EMA knows
nothing of emakit's trainer: :meth:`EMA.as_algorithm` gives the adapter a Trainer runs
(:mod:`emakit.algorithms.ema`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from emakit.deprecated import DeprecatedAlgorithmMethods
from emakit.ema.averages import check_windows, parse_averages
from emakit.ema.exports import EMAExports
from emakit.ema.names import EMANames
from emakit.ema.on_step import EMAOnStep
from emakit.ema.rates import no_rates, parse_rates
from emakit.ema.run_length import EMARunLength
from emakit.ema.state import EMAState
from emakit.ema.swaps import EMASwaps
from emakit.ema.window import Window
from emakit.functional import check_smoothing, check_warmup, warmup_smoothing
from emakit.shadow import ShadowWeights
from emakit.shadow.together import update_together
from emakit.storage.ranks import ranks
from emakit.time import Time, TimeUnit, as_time
from emakit.tracked import Selection

if TYPE_CHECKING:
    from emakit.algorithms.ema import EMAAlgorithm

__all__ = ["EMA"]


class _DefaultHalfLife(str):
    """The default half-life: distinguishable from a half-life passed explicitly alongside ``smoothing``."""


_DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")


class EMA(EMASwaps, EMAExports, EMAState, EMAOnStep, EMARunLength, EMANames, DeprecatedAlgorithmMethods):
    """An exponential moving average of a model's weights, for evaluation with smoother metrics.

    Args:
        half_life: time for a term's weight in the average to halve, ``"Nba"`` or ``"Nep"`` (a bare int
            counts batches: ``100`` is ``"100ba"``); or a fraction of the run, ``"0.02dur"`` (2% of its
            optimizer steps), resolved when the run's length is known (:meth:`set_run_length`: a Trainer
            and the integrations call it).
        smoothing: the per-update factor instead of ``half_life``, in (0, 1).
        decay: ``smoothing`` under the name timm, diffusers, torchtitan and Lightning give it (pass one of them).
        schedule: the smoothing as a function of the optimizer step instead (``schedule(step) -> smoothing``,
            steps counted from 1; a list: one average each), e.g. :func:`emakit.schedules.cosine` (DINO) or
            :func:`emakit.schedules.growing_half_life` (torchtitan). Updates count in ``"ba"``; no ``warmup``.
        average: the kind of each average, in order: ``"exponential"`` (one per rate of ``half_life``,
            ``smoothing`` or ``schedule``), ``"uniform"`` (SWA: ``avg = (w_1 + ... + w_n) / n`` over the due
            updates) or ``"window"`` (one per ``window``); default: the rates' exponential averages, then the
            windows'. See :mod:`emakit.ema.averages`.
        window: the length of each windowed average (``"1000ba"``, ``"2ep"``, in ``update_interval``'s unit; a
            list: one each): the uniform average of the last ``window`` of updates, kept in ``window_blocks``
            blocks, exact at every ``window / window_blocks`` (:mod:`emakit.ema.window`).
        window_blocks: how many blocks a window is kept in (memory: ``window_blocks + 1`` averages besides it).
        compile_update: with ``flatten_model=True``, update the exponential and uniform averages with one
            ``torch.compile``'d kernel per group that reads the weights once for all (:mod:`emakit.storage.fused`);
            the first update compiles it (seconds; a C++ compiler on the CPU).
        ema_start: when the average starts (initialised from the weights at the first update
            event at or after it); any unit, ``"0.3dur"`` meaning 30% of ``max_duration``.
        update_interval: how often to update, in ``half_life``'s unit; default ``1`` of it
            (``"1ba"`` with ``smoothing``).
        train_with_ema_weights: after each update, set the training weights to the average.
        ema_dtype: ``"auto"`` (fp32 average of bf16/fp16 weights), ``"same"``, or a dtype.
        ema_device: where the average lives (``"cpu"`` offloads it); default: with the weights.
        async_update: on CUDA, run updates on a side stream, overlapping the next forward pass
            (ordered before the next optimizer step and before any swap or state read).
        skip_nonfinite: skip (with a warning) updates whose weights hold NaN or Inf, instead of
            poisoning the average forever; costs one extra read of the weights per update.
        warmup: ramp the smoothing up over the first updates, so the average does not lag behind
            its start: ``None``, ``"tf"`` (``min(s, (1 + n) / (10 + n))``) or ``("power", gamma, power)``
            (``min(s, 1 - (1 + n / gamma) ** -power)``), ``n`` being the number of updates already
            applied, the start counting as one. See :func:`emakit.functional.warmup_smoothing`.
        min_smoothing: the least smoothing a warmup may use, in [0, 1).
        include, exclude: name patterns (``fnmatch``: ``"encoder.*"``, ``"*.lora_*"``) of the tensors to
            track, matched against ``state_dict`` names; untracked tensors are neither averaged, copied
            nor swapped (``ema_model`` shares the model's own).
        trainable_only: track parameters only where ``requires_grad`` (e.g. LoRA adapters, not the
            frozen base); a parameter frozen or unfrozen later is followed (its average restarts).
        buffers: floating-point buffers are ``"average"``-d (default), ``"copy"``-ed like integer
            ones, or ``"ignore"``-d with every other buffer.
        flatten_model: re-point the model's tensors into one flat buffer per (device, dtype), so an
            update is one kernel and a swap moves no data. Off by default: the model's tensors then
            stay where they are, which every other library relies on. See the README for the contract.
        shard_over_ranks: under data parallelism (DDP, ZeRO-1/2: every rank holds the whole weights), each rank
            keeps and updates 1/N of each average (a contiguous slice of the parameters laid end to end), with no
            communication per update; swaps all-gather the average into the model, exports gather it to rank 0,
            a state holds this rank's slice (it resumes on the same world size). Without a process group, or on
            one rank, the average is whole. Buffers stay whole. Not with ``flatten_model``; refused for weights
            an engine shards already (FSDP2, ZeRO-3). See ``docs/integrations/shard_over_ranks.md``.

    In a :class:`~emakit.Trainer`, pass it in ``algorithms=[ema]`` (the trainer runs :meth:`as_algorithm`):
    it updates at batch (or epoch) ends and evaluation uses the average. By hand, in any loop::

        ema = EMA(half_life="100ba")
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            ema.update(model)                 # once per optimizer step
        with ema.ema_weights(model):          # model holds the average inside
            evaluate(model)

    Or let every ``optimizer.step()`` update it: ``ema.update_on_step(optimizer, model)``.
    """

    def __init__(
        self,
        half_life: str | Time | Sequence[str | Time] | None = _DEFAULT_HALF_LIFE,
        smoothing: float | Sequence[float] | None = None,
        ema_start: str | Time = "0.0dur",
        update_interval: str | Time | None = None,
        train_with_ema_weights: bool = False,
        ema_dtype: str | torch.dtype = "auto",
        ema_device: str | torch.device | None = None,
        async_update: bool = False,
        skip_nonfinite: bool = False,
        warmup: str | tuple | None = None,
        min_smoothing: float = 0.0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        trainable_only: bool = False,
        buffers: str = "average",
        flatten_model: bool = False,
        shard_over_ranks: bool = False,
        *,
        decay: float | Sequence[float] | None = None,
        schedule: Callable[[int], float] | Sequence[Callable[[int], float]] | None = None,
        average: str | Sequence[str] | None = None,
        window: str | Time | Sequence[str | Time] | None = None,
        window_blocks: int = 4,
        compile_update: bool = False,
    ) -> None:
        if decay is not None:  # the peers' name of smoothing
            if smoothing is not None:
                raise ValueError(f"pass one of smoothing={smoothing!r} and decay={decay!r} (the same thing), not both")
            smoothing = decay
        given = half_life is not _DEFAULT_HALF_LIFE
        explicit = schedule is not None or smoothing is not None or (given and half_life is not None)
        rates = (
            parse_rates(half_life, smoothing, update_interval, half_life_given=given, schedule=schedule)
            if explicit
            else None
        )
        self.averages = parse_averages(average, window, window_blocks, rates.count if rates else 0)
        if rates is None:  # no rate given: the default half-life, unless no exponential average is asked for
            exponential = "exponential" in self.averages.kinds
            rates = (
                parse_rates(half_life, None, update_interval, half_life_given=given)
                if exponential
                else no_rates(update_interval, self.averages)
            )
        self._rates = rates
        per_block = check_windows(self.averages, self._rates.update_interval)
        self.schedules = self._rates.schedules
        if self.schedules is not None and (warmup is not None or min_smoothing):
            raise ValueError(
                f"schedule= gives every update's smoothing: warmup={warmup!r} and min_smoothing={min_smoothing!r} "
                "do not apply; ramp the schedule itself"
            )
        self.last_scheduled: tuple[int, tuple[float, ...]] | None = None  # (step, smoothings) of the last update
        self.half_lives, self.update_interval = self._rates.half_lives, self._rates.update_interval
        self.half_life = self.half_lives[0] if self.half_lives else None  # of the first average
        self.warmup = check_warmup(warmup)
        self.min_smoothing = check_smoothing(min_smoothing, high_inclusive=False, name="min_smoothing")
        self.smoothings: tuple[float, ...] | None = None  # until the run's length is known, for 'dur' half-lives
        self.smoothing: float | None = None  # the first average's
        if self._rates.smoothings is not None:  # None for half-lives in 'dur' (of_run): set at set_run_length
            self._set_smoothings(self._rates.smoothings)
        self.last_smoothing: float | None = None  # the smoothing of the last averaging update (with warmup)
        self.ema_start = as_time(ema_start, name="ema_start")
        for name, flag in (("train_with_ema_weights", train_with_ema_weights), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False")
        self.train_with_ema_weights = train_with_ema_weights
        self.skip_nonfinite = skip_nonfinite
        self.num_skipped = 0  # update events skipped because the weights held NaN or Inf
        selection = Selection.of(include, exclude, trainable_only, buffers)
        make_average = partial(
            ShadowWeights, ema_dtype, ema_device, async_update, selection=selection, shard_over_ranks=shard_over_ranks
        )
        self.shadows = [  # one per average; only the first may bind the model (flatten_model)
            make_average(flatten_model=flatten_model and index == 0) for index in range(len(self.averages.kinds))
        ]
        self.shard_over_ranks = shard_over_ranks
        if not isinstance(compile_update, bool) or (compile_update and not flatten_model):
            raise ValueError(
                f"compile_update={compile_update!r}: True needs flatten_model=True (its kernel reads the model's flat "
                "buffer once for every average), or False"
            )
        self.compile_update = compile_update
        self.shadow = self.shadows[0]
        self._windows = {  # the blocks behind each windowed average, by its position
            index: Window(
                self.shadows[index],
                partial(make_average, flatten_model=False),
                per_block.pop(0),
                window_blocks,
            )
            for index, kind in enumerate(self.averages.kinds)
            if kind == "window"
        }
        self.started = False
        self.num_updates = 0  # update events applied, the starting one included
        self.batches_seen = 0  # counted by update(model), in loops without a trainer
        self._run_batches: float | None = None  # the run's optimizer steps, once set_run_length was called
        self._algorithm: EMAAlgorithm | None = None  # the trainer's adapter, made by as_algorithm()
        self._stored: dict[int, ShadowWeights | None] = {}  # store(model) .. restore(model)
        self._step_hooks = None  # update_on_step(optimizer, model): the optimizer hooks that update this EMA
        self._updating_on_step = False

    def _set_smoothings(self, smoothings: tuple[float, ...]) -> None:
        if self.min_smoothing > min(smoothings):
            raise ValueError(f"min_smoothing={self.min_smoothing!r} must not exceed the smoothing {min(smoothings)!r}")
        self.smoothings, self.smoothing = smoothings, smoothings[0]

    # ------------------------------------------------------------ the schedule
    def update_at(self, model: nn.Module, count: int, start_reached: bool) -> bool:
        """Apply update event number ``count`` of a clock kept elsewhere; True when the average changed.

        For trainers that count batches or epochs themselves (emakit's Trainer, through
        :meth:`as_algorithm`): ``count`` is the batches (or epochs, with ``update_interval`` in
        ``ep``) done, ``start_reached`` whether their clock has reached ``ema_start``. An update is
        due when ``count`` is a multiple of ``update_interval`` and the start is reached. In a plain
        loop use :meth:`update`, which counts optimizer steps itself.
        """
        self._refuse_update_beside_hooks()
        if count % self.update_interval.value != 0 or not start_reached:
            return False
        if self.skip_nonfinite and not self.shadow.model_is_finite(model):
            self.num_skipped += 1
            warnings.warn(
                f"EMA: the model's weights hold NaN or Inf at update event {count}: update skipped "
                f"({self.num_skipped} so far), the average keeps its last finite value",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        if self._rates.of_run and self.smoothings is None:
            raise RuntimeError(
                f"half_life='{self.half_life}' is a fraction of the run, whose length the EMA does not know: "
                "call ema.set_run_length(total_optimizer_steps) before the first update, or train in a Trainer"
            )
        if self.started:
            used = self._smoothings_at(count)
            rates = iter(used)
            moved, weights = [], []  # the averages moved towards the weights, and by how much
            for index, (shadow, kind) in enumerate(zip(self.shadows, self.averages.kinds)):
                if kind == "window":
                    self._windows[index].update(model)
                    continue
                moved.append(shadow)  # the uniform mean of n + 1 updates: avg += (w - avg) / (n + 1)
                weights.append(1.0 - next(rates) if kind == "exponential" else 1.0 / (self.num_updates + 1))
            if self.compile_update:
                update_together(moved, model, weights)  # one pass over the weights for all
            else:
                for shadow, weight in zip(moved, weights):  # each reads the weights: ~1x one average's time
                    shadow.update(model, weight)
            self.last_smoothing = used[0] if used else None
        else:
            for shadow in self.shadows:
                shadow.copy_from_model(model)
            for window in self._windows.values():
                window.start(model)
            self.started = True
        self.num_updates += 1
        if self.train_with_ema_weights:
            self.shadow.copy_to_model(model)
        return True

    def _smoothings_at(self, step: int) -> list[float]:
        """Each average's smoothing for an update at optimizer step ``step``: its schedule's, or its own with warmup."""
        if self.schedules is None:
            if not self._rates.count:
                return []
            assert self.smoothings is not None  # checked by update_at
            return [warmup_smoothing(s, self.num_updates, self.warmup, self.min_smoothing) for s in self.smoothings]
        used = []
        for label, schedule in zip(self.exponential_labels, self.schedules):
            value = schedule(step)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"EMA {label}: the schedule gave smoothing {value!r} at step {step}, not in [0, 1]")
            used.append(float(value))
        self.last_scheduled = (step, tuple(used))
        return used

    def update(self, model: nn.Module, *, epoch: int | None = None, due: bool = True) -> bool:
        """Count one batch (one optimizer step) of ``model``; update the average when one is due.

        Returns whether the average was updated. For loops without an emakit Trainer, where
        ``update_interval`` counts batches. ``epoch`` (the current epoch, from 0) is needed only
        when ``ema_start`` is in epochs: the average starts at the first due batch of that epoch.
        ``ema_start`` in ``dur`` needs the run's length (:meth:`set_run_length`). ``due=False`` counts the
        batch without an update: for loops that choose their update steps themselves (the Lightning callback's
        ``should_update``), where each chosen step is one update (``update_interval`` ``"1ba"``).

        Example::

            >>> ema = EMA(half_life="100ba", ema_start="2ep")
            >>> ema.update(model, epoch=0)     # False: epoch 2 has not begun
        """
        if self.update_interval.unit is not TimeUnit.BATCH:
            raise ValueError(
                f"update(model) counts batches, but update_interval is {self.update_interval}: "
                "use 'ba' units by hand, or run the EMA in an emakit Trainer"
            )
        if self.shadow.swapped:
            raise RuntimeError(
                "cannot update the EMA: its weights are swapped into the model; "
                "leave ema_weights(...) or call get_training_model(model) first"
            )
        count = self.batches_seen + 1
        updated = due and self.update_at(model, count, self.start_reached(count, epoch))
        self.batches_seen = count  # counted only once the update event went through
        return updated

    def wait(self) -> None:
        """With ``async_update=True``: make the device's current stream wait for a pending update (the host does
        not block). ``optimizer.step()`` and every operation of the EMA wait by themselves; call this before
        writing the weights any other way right after an update (a weight clamp, ``load_state_dict``)."""
        for shadow in self.shadows:
            shadow.wait()

    @property
    def state_is_per_rank(self) -> bool:
        """Whether :meth:`state_dict` holds this rank's data only (``shard_over_ranks`` slices on several ranks,
        DeepSpeed ZeRO-3 partitions): every rank must then save its own state and load it back on the same rank of
        the same world size, where a whole average is saved by one rank and loaded by all.

        Example (an integration's checkpoint hook)::

            >>> name = f"ema-rank{rank}.pt" if ema.state_is_per_rank else "ema.pt"
        """
        if self.shard_over_ranks and ranks() is not None:
            return True
        return self.shadow.partitioning() is not None

    def attach(self, model: nn.Module) -> None:
        """Lay every average out for ``model`` now (allocating it) rather than at the first update."""
        for shadow in self.shadows:
            shadow.attach(model)

    def as_algorithm(self) -> EMAAlgorithm:
        """This EMA as an :class:`~emakit.Algorithm` of emakit's Trainer (:class:`~emakit.algorithms.ema.EMAAlgorithm`).

        ``Trainer(algorithms=[ema])`` calls it (:func:`emakit.core.algorithm.as_algorithm`). One adapter per EMA,
        made at the first call: the same EMA listed in two places is one algorithm. Example::

            >>> ema = EMA(half_life="50ba")
            >>> ema.as_algorithm() is ema.as_algorithm()
            True
        """
        algorithm = getattr(self, "_algorithm", None)
        if algorithm is None or algorithm.ema is not self:  # none yet, or a shallow copy's
            from emakit.algorithms.ema import EMAAlgorithm  # the trainer's side, imported when a trainer runs

            algorithm = self._algorithm = EMAAlgorithm(self)
        return algorithm
