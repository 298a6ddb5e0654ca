"""When an :class:`~emakit.EMA` updates in its run: whether ``ema_start`` is reached, and the run's length.

``ema_start`` may be in optimizer steps (``"100ba"``), epochs (``"2ep"``: by hand, ``ema.update(model, epoch=)``) or a
fraction of the run (``"0.3dur"``); half-lives in ``dur`` and schedules spanning the run learn its length from
:meth:`EMARunLength.set_run_length`, which also warns when a half-life is too long for the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from emakit.ema.rates import Rates, run_length_warning, smoothings_for_run
from emakit.time import Time, TimeUnit

__all__ = ["EMARunLength"]


class EMARunLength:
    """:class:`~emakit.EMA`'s clock: :meth:`start_reached` and :meth:`set_run_length`."""

    ema_start: Time
    update_interval: Time
    warmup: tuple | None
    smoothings: tuple[float, ...] | None
    schedules: tuple[Callable[[int], float], ...] | None
    exponential_labels: property
    _rates: Rates
    _run_batches: float | None
    _set_smoothings: Callable[[tuple[float, ...]], None]

    def start_reached(self, batch: int, epoch: int | None) -> bool:
        """Whether ``ema_start`` is reached at optimizer step ``batch`` (counted from 1) of epoch ``epoch``: for loops
        that keep their own clock and call :meth:`~emakit.EMA.update_at` (the Lightning callback's ``should_update``
        and epoch updates)."""
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
        if self.schedules is not None:  # a schedule spanning the run learns its length; no half-life to warn about
            for schedule in self.schedules:
                if callable(getattr(schedule, "set_run_length", None)):
                    schedule.set_run_length(batches)  # type: ignore[attr-defined]
            return
        if start is None:
            start = {TimeUnit.BATCH: self.ema_start.value, TimeUnit.DURATION: self.ema_start.value * batches}.get(
                self.ema_start.unit, 0
            )
        if interval is None and self.update_interval.unit is TimeUnit.BATCH:
            interval = self.update_interval.value
        if interval is not None and batches > start and self.warmup is None and self.smoothings:
            message = run_length_warning(self.exponential_labels, self.smoothings, batches - start, interval)
            if message:
                warnings.warn(message, stacklevel=2)
