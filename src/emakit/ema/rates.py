"""How fast an EMA forgets: its averages' smoothings from half-lives, and whether a run is long enough for them.

``smoothing = 2 ** (-(update_interval / half_life))``: after ``u`` updates a weight's share of the
average has fallen by ``smoothing ** u``, so the weights the average started from still hold
``smoothing ** u`` of it (without warmup). A half-life in ``dur`` is a fraction of the run
(``"0.02dur"``: 2% of its optimizer steps); its smoothing is known once the run's length is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from emakit.ema.averages import Averages
from emakit.functional import check_smoothing, smoothing_from_half_life
from emakit.time import Time, TimeUnit, as_interval, as_time

__all__ = ["INITIAL_SHARE_WARNING", "Rates", "no_rates", "parse_rates", "run_length_warning", "smoothings_for_run"]

INITIAL_SHARE_WARNING = 0.01  # warn when the first weights keep more of the final average than this
HALF_LIFE_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.DURATION)
_COUNTED_IN = {TimeUnit.DURATION: TimeUnit.BATCH}  # the unit of update_interval for a half-life of this unit


@dataclass(frozen=True)
class Rates:
    """One smoothing per average (``None`` until the run's length is known, for ``dur`` half-lives), the
    half-lives they came from (``None`` when given as smoothings), and the update interval."""

    half_lives: tuple[Time, ...] | None
    smoothings: tuple[float, ...] | None
    update_interval: Time
    schedules: tuple[Callable[[int], float], ...] | None = None  # EMA(schedule=...): smoothing(step)

    @property
    def count(self) -> int:
        """How many averages."""
        if self.schedules is not None:
            return len(self.schedules)
        if self.half_lives is not None:
            return len(self.half_lives)
        return len(self.smoothings or ())  # none: an EMA of uniform or windowed averages only

    @property
    def of_run(self) -> bool:
        """Whether the half-lives are fractions of the run (``dur``)."""
        return self.half_lives is not None and self.half_lives[0].unit is TimeUnit.DURATION


def parse_rates(
    half_life: str | Time | Sequence[str | Time] | None,
    smoothing: float | Sequence[float] | None,
    update_interval: str | Time | None,
    half_life_given: bool = True,
    schedule: Callable[[int], float] | Sequence[Callable[[int], float]] | None = None,
) -> Rates:
    """The averages of ``EMA(half_life=..., smoothing=..., update_interval=...)``, validated.

    One of ``half_life`` (``"100ba"``, a bare int counting batches, or a tuple for several averages) and
    ``smoothing`` (in (0, 1), or a tuple); ``half_life_given=False`` marks ``half_life`` as the default, which
    ``smoothing`` replaces. ``update_interval`` defaults to 1 of the half-life's unit (``"1ba"`` with smoothings).

    Example::

        >>> parse_rates(("50ba", "100ba"), None, None).smoothings
        (0.9862327044933592, 0.9930924954370359)
    """
    if schedule is not None:
        return _parse_schedules(schedule, smoothing, half_life if half_life_given else None, update_interval)
    if smoothing is not None and half_life is not None and half_life_given:
        raise ValueError(f"pass exactly one of half_life={half_life!r} and smoothing={smoothing!r}, not both")
    if smoothing is None and half_life is None:
        raise ValueError("pass one of half_life (e.g. '100ba') or smoothing (e.g. 0.999)")
    given = smoothing if smoothing is not None else half_life
    values: list[Any] = list(given) if isinstance(given, (tuple, list)) else [given]  # each checked below
    if not values:
        raise ValueError(f"{'smoothing' if smoothing is not None else 'half_life'}={given!r} is empty")
    if smoothing is not None:
        interval = as_interval(update_interval if update_interval is not None else "1ba", name="update_interval")
        smoothings = tuple(check_smoothing(v, low_inclusive=False, high_inclusive=False) for v in values)
        rates = Rates(None, smoothings, interval)
    else:
        fractions = [v for v in values if isinstance(v, float) and 0 < v < 1]
        if fractions:  # EMA(0.999): a smoothing passed where the half-life goes
            raise ValueError(
                f"half_life={fractions[0]!r} is not a time; a factor in (0, 1) is a smoothing: EMA(smoothing="
                f"{fractions[0]!r}) (or decay=...), or give the half-life as '100ba' or 100 (batches)"
            )
        half_lives = tuple(as_time(v, name="half_life", int_unit=TimeUnit.BATCH) for v in values)  # 100: "100ba"
        if any(h.unit not in HALF_LIFE_UNITS or h.value <= 0 for h in half_lives):
            raise ValueError(
                f"half_life={half_life!r} must be > 0 and in 'ba', 'ep' or 'dur' (a fraction of the run), e.g. '100ba'"
            )
        if len({h.unit for h in half_lives}) != 1:
            raise ValueError(f"half_life={half_life!r}: several half-lives must share a unit")
        unit = half_lives[0].unit
        interval = as_interval(
            update_interval if update_interval is not None else Time(1, _COUNTED_IN.get(unit, unit)),
            name="update_interval",
        )
        if interval.unit is not _COUNTED_IN.get(unit, unit):
            raise ValueError(
                f"update_interval={update_interval!r} and half_life={half_life!r} must share a unit "
                "('ba' for a half-life in 'dur')"
            )
        smoothings = None
        if unit is not TimeUnit.DURATION:
            smoothings = _smoothings([h.value for h in half_lives], interval, f"half_life={half_life!r}")
        rates = Rates(half_lives, smoothings, interval)
    keys = rates.half_lives if rates.smoothings is None else rates.smoothings
    assert keys is not None  # one of them is given
    if len(set(keys)) != len(keys):
        raise ValueError(f"{given!r} repeats an average: give each once")
    return rates


def no_rates(update_interval: str | Time | None, averages: Averages) -> Rates:
    """The rates of an EMA without exponential averages (``average="uniform"``, ``window=...``): its update interval
    only, by default 1 of its windows' unit (``"1ba"`` without windows)."""
    default = Time(1, averages.windows[0].unit) if averages.windows else "1ba"
    return Rates(
        None, None, as_interval(update_interval if update_interval is not None else default, name="update_interval")
    )


def _parse_schedules(
    schedule: Callable[[int], float] | Sequence[Callable[[int], float]],
    smoothing: object,
    half_life: object,
    update_interval: str | Time | None,
) -> Rates:
    """``EMA(schedule=f)`` or ``schedule=[f, g]`` (one average each): callables of the optimizer step."""
    if smoothing is not None or half_life is not None:
        given = f"smoothing={smoothing!r}" if smoothing is not None else f"half_life={half_life!r}"
        raise ValueError(f"pass one of schedule= and {given}: a schedule gives the smoothing of every update")
    schedules = tuple(schedule) if isinstance(schedule, (list, tuple)) else (schedule,)
    if not schedules or not all(callable(f) for f in schedules):
        raise ValueError(f"schedule={schedule!r} must be a callable step -> smoothing, or a list of them")
    interval = as_interval(update_interval if update_interval is not None else "1ba", name="update_interval")
    if interval.unit is not TimeUnit.BATCH:
        raise ValueError(f"update_interval='{interval}': a schedule counts optimizer steps, give it in 'ba'")
    return Rates(None, None, interval, schedules)


def _smoothings(half_lives: Sequence[float], interval: Time, described: str) -> tuple[float, ...]:
    smoothings = tuple(smoothing_from_half_life(h, interval.value) for h in half_lives)
    if not all(0 < s < 1 for s in smoothings):
        raise ValueError(
            f"update_interval='{interval}' over {described} gives smoothing {smoothings!r}, outside (0, 1)"
        )
    return smoothings


def smoothings_for_run(rates: Rates, batches: float) -> tuple[float, ...]:
    """The smoothings of ``dur`` half-lives in a run of ``batches`` optimizer steps (others: as they are).

    A half-life of ``f`` dur is ``f * batches`` batches: ``smoothing = 2 ** (-(interval / (f * batches)))``.

    Example::

        >>> smoothings_for_run(parse_rates("0.02dur", None, None), 5000)  # 100 batches
        (0.9930924954370359,)
    """
    if not rates.of_run:
        assert rates.smoothings is not None  # known without the run's length
        return rates.smoothings
    assert rates.half_lives is not None  # of_run: half-lives in 'dur'
    if not batches > 0:
        raise ValueError(f"a half-life in 'dur' needs a run of a known number of batches, got {batches!r}")
    in_batches = [h.value * batches for h in rates.half_lives]
    described = f"half-lives {[str(h) for h in rates.half_lives]} of a {batches:g}-batch run"
    return _smoothings(in_batches, rates.update_interval, described)


def run_length_warning(labels: Sequence[str], smoothings: Sequence[float], batches: float, interval: float) -> str:
    """What to say when ``batches`` (updates every ``interval`` batches) leave an average over 1% of its start.

    Each average whose first weights still hold ``smoothing ** (batches / interval)`` > 1% of it is
    named with its half-life in batches and that share; ``""`` when none does.

    Example::

        >>> run_length_warning(["ema@1000ba"], [0.5 ** (1 / 1000)], 2000, 1)[:40]
        'EMA: 2000 batches are averaged, too few '
    """
    updates = batches / interval
    too_long = [
        f"{label} ({math.log(0.5) / math.log(s) * interval:.0f} batches) ends holding {share:.0%}"
        for label, s in zip(labels, smoothings)
        if (share := s**updates) > INITIAL_SHARE_WARNING
    ]
    if not too_long:
        return ""
    return (
        f"EMA: {batches:.0f} batches are averaged, too few for the half-life: {'; '.join(too_long)} of the "
        "weights it started from. Half-lives of 1-5% of the run did best (docs/evidence.md): pass a shorter "
        "half_life, or warmup='tf'"
    )
