"""EMA, the algorithm: when to start, update and swap an exponential moving average of the weights.

Storage, arithmetic and swaps live in :class:`emakit.shadow.ShadowWeights`; this module only
decides *when*. Each update event (a batch end for ``ba`` units, an epoch end for ``ep``)
whose count is a multiple of ``update_interval`` and at or after ``ema_start``::

    first event:  ema = param                                   (the average starts at the weights)
    later events: ema = smoothing * ema + (1 - smoothing) * param
                  smoothing = 2 ** (-(update_interval / half_life))

With ``train_with_ema_weights=True`` the training weights are then set to ``ema``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emakit.algorithms.rates import parse_rates, run_length_warning, smoothings_for_run
from emakit.batchnorm import running_statistics, update_bn
from emakit.core.algorithm import Algorithm
from emakit.core.event import Event
from emakit.core.state import State
from emakit.export import save_state_dict
from emakit.functional import check_smoothing, check_warmup, warmup_smoothing
from emakit.loggers import Logger
from emakit.shadow import ShadowWeights, swapped_into
from emakit.time import Time, TimeUnit, as_time
from emakit.tracked import Selection

__all__ = ["EMA"]

_STATE_VERSION = 1


class _DefaultHalfLife(str):
    """The default half-life: distinguishable from a half-life passed explicitly alongside ``smoothing``."""


_DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")


class EMA(Algorithm):
    """An exponential moving average of a model's weights, for evaluation with smoother metrics.

    Args:
        half_life: time for a term's weight in the average to halve, ``"Nba"`` or ``"Nep"``; or a
            fraction of the run, ``"0.02dur"`` (2% of its optimizer steps), resolved when the run's
            length is known (:meth:`set_run_length`: a Trainer and the integrations call it).
        smoothing: the per-update factor instead of ``half_life``, in (0, 1).
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

    In a :class:`~emakit.Trainer`, pass it in ``algorithms=[ema]``: it updates at batch (or
    epoch) ends and evaluation uses the average. By hand, in any loop::

        ema = EMA(half_life="100ba")
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            ema.update(model)                 # once per optimizer step
        with ema.ema_weights(model):          # model holds the average inside
            evaluate(model)
    """

    def __init__(
        self,
        half_life: str | Time | None = _DEFAULT_HALF_LIFE,
        smoothing: float | None = None,
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
    ) -> None:
        given = half_life is not _DEFAULT_HALF_LIFE
        self._rates = parse_rates(half_life, smoothing, update_interval, half_life_given=given)
        self.half_lives, self.update_interval = self._rates.half_lives, self._rates.update_interval
        self.half_life = self.half_lives[0] if self.half_lives else None  # of the first average
        self.warmup = check_warmup(warmup)
        self.min_smoothing = check_smoothing(min_smoothing, high_inclusive=False, name="min_smoothing")
        self.smoothings: tuple[float, ...] | None = None  # until the run's length is known, for 'dur' half-lives
        self.smoothing: float | None = None  # the first average's
        if not self._rates.of_run:
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
        self.shadows = [  # one per average; only the first may bind the model (flatten_model)
            ShadowWeights(ema_dtype, ema_device, async_update, flatten_model and index == 0, selection)
            for index in range(self._rates.count)
        ]
        self.shadow = self.shadows[0]
        self.started = False
        self.num_updates = 0  # update events applied, the starting one included
        self.batches_seen = 0  # counted by update(model), in loops without a trainer
        self._run_batches: float | None = None  # the run's optimizer steps, once set_run_length was called

    def _set_smoothings(self, smoothings: tuple[float, ...]) -> None:
        if self.min_smoothing > min(smoothings):
            raise ValueError(f"min_smoothing={self.min_smoothing!r} must not exceed the smoothing {min(smoothings)!r}")
        self.smoothings, self.smoothing = smoothings, smoothings[0]

    def __repr__(self) -> str:
        if self.half_lives is not None:
            rate = "half_life=" + (
                f"'{self.half_life}'" if len(self.half_lives) == 1 else str(tuple(map(str, self.half_lives)))
            )
        else:
            rate = f"smoothing={self.smoothing if len(self.smoothings) == 1 else self.smoothings}"
        return f"EMA({rate}, update_interval='{self.update_interval}', ema_start='{self.ema_start}')"

    # ------------------------------------------------------------ the schedule
    def _on_update_event(self, model: nn.Module, count: int, start_reached: bool) -> bool:
        """Apply the update event number ``count`` (batches or epochs done); True when the average changed."""
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
        if self.smoothings is None:
            raise RuntimeError(
                f"half_life='{self.half_life}' is a fraction of the run, whose length the EMA does not know: "
                "call ema.set_run_length(total_optimizer_steps) before the first update, or train in a Trainer"
            )
        if self.started:
            used = [warmup_smoothing(s, self.num_updates, self.warmup, self.min_smoothing) for s in self.smoothings]
            for shadow, smoothing in zip(self.shadows, used):  # each reads the weights: ~1x one average's time
                shadow.update(model, 1.0 - smoothing)
            self.last_smoothing = used[0]
        else:
            for shadow in self.shadows:
                shadow.copy_from_model(model)
            self.started = True
        self.num_updates += 1
        if self.train_with_ema_weights:
            self.shadow.copy_to_model(model)
        return True

    def update(self, model: nn.Module, *, epoch: int | None = None) -> bool:
        """Count one batch (one optimizer step) of ``model``; update the average when one is due.

        Returns whether the average was updated. For loops without an emakit Trainer, where
        ``update_interval`` counts batches. ``epoch`` (the current epoch, from 0) is needed only
        when ``ema_start`` is in epochs: the average starts at the first due batch of that epoch.
        ``ema_start`` in ``dur`` needs the run's length (:meth:`set_run_length`).

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
        updated = self._on_update_event(model, count, self._start_reached(count, epoch))
        self.batches_seen = count  # counted only once the update event went through
        return updated

    def _start_reached(self, batch: int, epoch: int | None) -> bool:
        """Whether ``ema_start`` is reached at optimizer step ``batch`` (counted from 1) of epoch ``epoch``."""
        start = self.ema_start
        if start.value == 0:
            return True
        if start.unit is TimeUnit.BATCH:
            return batch >= start.value
        if start.unit is TimeUnit.EPOCH:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(
                    f"ema_start='{start}' counts epochs: pass the current epoch (from 0), "
                    f"ema.update(model, epoch=epoch); got epoch={epoch!r}"
                )
            return epoch >= start.value
        if start.unit is TimeUnit.DURATION:
            if self._run_batches is None:
                raise RuntimeError(
                    f"ema_start='{start}' is a fraction of the run, whose length the EMA does not know: "
                    "call ema.set_run_length(total_optimizer_steps) before the first update"
                )
            return batch >= start.value * self._run_batches
        raise ValueError(
            f"ema_start='{start}' needs a Trainer's clock (samples or tokens); by hand use 'ba', 'ep' or 'dur'"
        )

    # -------------------------------------------------------------- swapping
    def _require_average(self) -> None:
        if not self.started:
            raise RuntimeError(
                "the EMA has not started: no update event has reached ema_start "
                f"('{self.ema_start}') yet, so there are no EMA weights"
            )

    def _average(self, index: int) -> ShadowWeights:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.shadows):
            raise ValueError(f"index={index!r} must be an int in [0, {len(self.shadows)}): this EMA keeps that many")
        return self.shadows[index]

    @property
    def swapped(self) -> bool:
        """Whether one of this EMA's averages is in the model now."""
        return any(shadow.swapped for shadow in self.shadows)

    def get_ema_model(self, model: nn.Module, index: int = 0) -> nn.Module:
        """Put average ``index`` into ``model`` and return it (see :meth:`ema_weights`)."""
        shadow = self._average(index)
        self._require_average()
        if not shadow.swapped:
            shadow.swap_in(model)
        return model

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """Put ``model``'s training weights back (bit for bit) and return it."""
        for shadow in swapped_into(model)[::-1]:
            if any(shadow is mine for mine in self.shadows):
                shadow.swap_out(model)
        return model

    def ema_weights(self, model: nn.Module, index: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        """Inside the block ``model`` holds average ``index`` (the first by default); on exit its own weights again.

        On exit the training weights are back bit for bit and the average is as it was: buffers
        (BatchNorm statistics a train-mode forward updates) are restored from a copy, and a
        parameter written in place inside the block makes the exit raise, naming it. Autograd
        across the block's edges raises (the swap is an in-place change of the parameters).
        Swaps nest: an inner block of another EMA must end first.
        """
        return _EMAWeights(self, model, self._average(index))

    def update_bn(self, loader: Iterable, model: nn.Module, **kwargs: Any) -> None:
        """Measure the average's own BatchNorm statistics over ``loader`` (see :func:`emakit.update_bn`).

        The average's parameters are swapped in, every BatchNorm layer's running statistics are
        recomputed over one pass, stored as the average's buffers, and the training weights and their
        statistics go back unchanged. Keyword arguments (``device``, ``inputs``) go to :func:`emakit.update_bn`.
        """
        self._require_average()
        self.attach(model)
        untracked = [name for name in running_statistics(model) if name not in self.shadow.state_dict_keys]
        if untracked:
            raise ValueError(
                f"update_bn: this EMA does not track the BatchNorm statistics {', '.join(untracked[:5])} "
                f"(buffers={self.shadow.selection.buffers!r}, include/exclude patterns): the average has no place "
                "to keep them, and measuring them would overwrite the training model's; track them "
                "(buffers='average' or 'copy', patterns that keep them) or call emakit.update_bn on a model you own"
            )
        for index, shadow in enumerate(self.shadows):  # every average gets statistics of its own
            with self.ema_weights(model, index):
                update_bn(loader, model, **kwargs)
                shadow.keep_buffers_from_model()

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

    def ema_model_at(self, index: int) -> nn.Module:
        """:attr:`ema_model` of average ``index`` (several half-lives: in the order given)."""
        shadow = self._average(index)
        self._require_average()
        model = shadow.attached_model()
        if model is None:
            raise RuntimeError("the EMA has not seen its model yet: call get_ema_model(model) instead")
        return shadow.module(model)

    def ema_state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Average ``index`` as a ``state_dict`` of the model: detached copies, keyed like ``model.state_dict()``.

        ``model.load_state_dict(ema.ema_state_dict())`` puts the average into a plain model (with
        ``strict=False`` when ``include``/``exclude``/``buffers`` left tensors untracked: only tracked
        ones are in it). Averages of bf16/fp16 weights are fp32 (``ema_dtype="auto"``); ``load_state_dict``
        casts them. For an FSDP2-sharded model the shards are gathered (collective: call it on every rank).
        """
        shadow = self._average(index)
        self._require_average()
        return shadow.model_state_dict()

    @contextlib.contextmanager
    def training_weights(self, state: State) -> Iterator[None]:
        """Inside, ``state.model`` holds its training weights, even during an evaluation."""
        swapped = [shadow for shadow in swapped_into(state.model) if any(shadow is mine for mine in self.shadows)]
        for shadow in reversed(swapped):
            shadow.swap_out(state.model)
        try:
            yield
        finally:
            for shadow in swapped:
                shadow.swap_in(state.model)

    @property
    def labels(self) -> list[str]:
        """A short name per average: ``"ema@50ba"``, or ``"ema@0.999"`` when given by its smoothing."""
        if self.half_lives is not None:
            return [f"ema@{h}" for h in self.half_lives]
        return [f"ema@{s:g}" for s in self.smoothings]

    @property
    def label(self) -> str:
        """The first average's :attr:`labels` entry."""
        return self.labels[0]

    def evaluation_weights(self, state: State) -> dict[str, contextlib.AbstractContextManager]:
        """Every average, once they have started, under its label."""
        if not self.started:
            return {}
        return {label: self.ema_weights(state.model, i) for i, label in enumerate(self.labels)}

    # --------------------------------------------------------------- trainer
    def match(self, event: Event, state: State) -> bool:
        if event in (Event.EVAL_START, Event.EVAL_END):
            return self.started
        update_event = Event.BATCH_END if self.update_interval.unit is TimeUnit.BATCH else Event.EPOCH_END
        return event in (update_event, Event.INIT, Event.BEFORE_LOAD, Event.FIT_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.INIT:
            if state.parallelism == "fsdp":  # FSDP refuses deepcopy: ema_model is built from this weightless copy
                self.remember_structure(state.model)
        elif event is Event.BEFORE_LOAD:  # allocate now: a sharded checkpoint is loaded into the average in place
            self.attach(state.model)
        elif event is Event.FIT_START:
            self._check_start(state)
            if self.started:  # resumed: bind the model now, so ema_model and exports work before the next update
                self.attach(state.model)
        elif event is Event.EVAL_START:
            self.get_ema_model(state.model)
        elif event is Event.EVAL_END:
            self.get_training_model(state.model)
        else:
            count = state.timestamp.get(self.update_interval.unit)
            if self._on_update_event(state.model, count, state.reached(self.ema_start)):
                metrics = {"ema/num_updates": self.num_updates}
                if self.last_smoothing is not None:
                    metrics["ema/smoothing"] = self.last_smoothing
                logger.log_metrics(metrics)

    def _check_start(self, state: State) -> None:
        start, end = state.in_batches(self.ema_start), state.in_batches(state.max_duration)
        if end is None:
            if self._rates.of_run:
                raise ValueError(
                    f"half_life='{self.half_life}' is a fraction of the run, but max_duration='{state.max_duration}' "
                    "does not say how many batches the run has: give max_duration in 'ba' or 'ep'"
                )
            return
        if start is not None and start > end:
            warnings.warn(
                f"EMA ema_start='{self.ema_start}' lies beyond max_duration='{state.max_duration}': "
                "the average will never start",
                stacklevel=2,
            )
        self.set_run_length(end, start, state.in_batches(self.update_interval))

    def set_run_length(self, batches: float, start: float | None = None, interval: float | None = None) -> None:
        """Tell the EMA its run has ``batches`` optimizer steps: half-lives in ``dur`` get their smoothing, and
        a half-life too long for the run is warned about.

        ``half_life="0.02dur"`` in a 5000-step run is 100 batches: ``smoothing = 2 ** (-1 / 100)``.
        Without warmup, after ``u`` updates the weights the average started from still hold
        ``smoothing ** u`` of it; above 1% the average lags the training weights (``docs/evidence.md``:
        half-lives of 1-5% of the run did best), and the warning names each such average and its share.
        ``start`` is the batch where the average starts (default: ``ema_start`` when in batches, else 0),
        ``interval`` the batches between updates (default: ``update_interval`` when in batches).
        emakit's Trainer, the Lightning callback and the Hugging Face callback call this when training
        starts; by hand, call it before the first update.

        Example::

            >>> ema = EMA(half_life="0.02dur")
            >>> ema.set_run_length(5000)
            >>> round(ema.smoothing, 6)
            0.993092
            >>> EMA(half_life="1000ba").set_run_length(2000)  # warns: the first weights keep 25%
        """
        if self._rates.of_run:
            self._set_smoothings(smoothings_for_run(self._rates, batches))
        self._run_batches = batches
        if start is None:
            start = {TimeUnit.BATCH: self.ema_start.value, TimeUnit.DURATION: self.ema_start.value * batches}.get(
                self.ema_start.unit, 0
            )
        if interval is None and self.update_interval.unit is TimeUnit.BATCH:
            interval = self.update_interval.value
        if interval is not None and batches > start and self.warmup is None:
            message = run_length_warning(self.labels, self.smoothings, batches - start, interval)
            if message:
                warnings.warn(message, stacklevel=2)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "smoothing": self.smoothing,
            **self.state_dict_rates(),
            "started": self.started,
            "num_updates": self.num_updates,
            "batches_seen": self.batches_seen,
            "num_skipped": self.num_skipped,
            "last_smoothing": self.last_smoothing,
            "weights": self.shadow.state_dict(),  # the first average
            "more_weights": [shadow.state_dict() for shadow in self.shadows[1:]],  # the others, in order
            "state_dict_keys": dict(self.shadow.state_dict_keys),
        }

    def attach(self, model: nn.Module) -> None:
        """Lay every average out for ``model`` now (allocating it) rather than at the first update."""
        for shadow in self.shadows:
            shadow.attach(model)

    def save_ema_weights(self, path: str | Path, index: int = 0) -> Path:
        """Write average ``index``'s weights to ``path`` as safetensors, keyed like the model's ``state_dict``.

        The file loads into a plain model: ``model.load_state_dict(safetensors.torch.load_file(path))``.
        """
        self._average(index)
        if not self.started:
            raise ValueError("the EMA has not started: there are no EMA weights to save")
        return save_state_dict(self.ema_state_dict(index), path)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from ``state`` (as :meth:`state_dict` gave it): the averages, their counters and clock.

        The state must come from an EMA with the same rates (half-lives or smoothings, update interval,
        warmup): resuming with other ones would silently continue another average. ``strict=False``
        continues with this EMA's rates instead, with a warning.
        """
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
            shadow.load_state_dict(weights)
            if shadow.attached_model() is None:
                shadow.state_dict_keys = dict(state.get("state_dict_keys") or {})
        self.started = bool(state["started"])
        self.num_updates = int(state["num_updates"])
        self.batches_seen = int(state["batches_seen"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.last_smoothing = state.get("last_smoothing")

    def _rate_differences(self, state: dict[str, Any]) -> list[str]:
        """What of the rates in ``state`` differs from this EMA's (entries a state lacks are not compared)."""
        mine = self.state_dict_rates()
        if state.get("half_lives") is not None and mine["half_lives"] is not None:
            mine.pop("smoothings")  # half-lives in 'dur' get their smoothing only once the run's length is known
        elif state.get("smoothings") is None and self.smoothing is not None:
            mine = {"smoothing": self.smoothing, **mine}  # a state from before 'smoothings' was saved
        return [
            f"{key} {state[key]!r} saved, {value!r} here"
            for key, value in mine.items()
            if key in state and state[key] != value and value is not None
        ]

    def state_dict_rates(self) -> dict[str, Any]:
        """The entries of :meth:`state_dict` that say how the average moves."""
        return {
            "half_lives": None if self.half_lives is None else [str(h) for h in self.half_lives],
            "smoothings": None if self.smoothings is None else list(self.smoothings),
            "update_interval": str(self.update_interval),
            "warmup": _warmup_state(self.warmup),
            "min_smoothing": self.min_smoothing,
        }


def _warmup_state(warmup: tuple | None) -> str | list | None:
    """A warmup as the user spells it, in plain values: ``"tf"``, ``["power", 1.0, 0.75]`` or None."""
    if warmup is None:
        return None
    return warmup[0] if len(warmup) == 1 else list(warmup)


class _EMAWeights(contextlib.AbstractContextManager):
    """``with ema.ema_weights(model):`` — a plain class rather than a generator: cheaper to enter and leave."""

    def __init__(self, ema: EMA, model: nn.Module, shadow: ShadowWeights) -> None:
        self.ema, self.model, self.shadow = ema, model, shadow

    def __enter__(self) -> nn.Module:
        self.ema._require_average()
        self.already_in = self.shadow.swapped
        if not self.already_in:
            self.shadow.swap_in(self.model)
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if not self.already_in:
            self.shadow.swap_out(self.model)
