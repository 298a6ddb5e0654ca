"""Which averages an :class:`~emakit.EMA` keeps: exponential, uniform (SWA) or windowed, in one order.

With ``n`` the updates applied so far (the start counting as one) and ``w`` the weights at each update::

    exponential:  ema = s * ema + (1 - s) * w            s from half_life, smoothing or schedule
    uniform:      avg = (w_1 + ... + w_n) / n             every update weighs the same (SWA)
    window:       avg = mean of the last `window` updates, up to the last completed block (see emakit.ema.window)

The uniform average is a moving average too: ``avg = avg + (w - avg) / n``, one ``lerp`` per update as for an
exponential one. ``EMA(average=...)`` names them; the exponential ones take the rates (``half_life``, ``smoothing``,
``schedule``) in order, the windowed ones the ``window`` lengths in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emakit.time import Time, TimeUnit, as_time

__all__ = ["KINDS", "Averages", "parse_averages"]

KINDS = ("exponential", "uniform", "window")


@dataclass(frozen=True)
class Averages:
    """The kind of each average in order, the windows of the windowed ones, and how many blocks a window keeps."""

    kinds: tuple[str, ...]
    windows: tuple[Time, ...] = ()
    window_blocks: int = 4

    @property
    def exponential(self) -> list[int]:
        """The positions of the exponential averages."""
        return [i for i, kind in enumerate(self.kinds) if kind == "exponential"]

    def window_of(self, index: int) -> Time:
        """The window of average ``index`` (a windowed one)."""
        return self.windows[self.kinds[:index].count("window")]

    def labels(self, exponential_labels: Sequence[str]) -> list[str]:
        """A label per average: the exponential ones' as given, ``"uniform"``, ``"window@1000ba"``."""
        given = iter(exponential_labels)
        windows = iter(self.windows)
        return [
            next(given) if kind == "exponential" else "uniform" if kind == "uniform" else f"window@{next(windows)}"
            for kind in self.kinds
        ]


def parse_averages(
    average: str | Sequence[str] | None,
    window: str | Time | Sequence[str | Time] | None,
    window_blocks: int,
    rates_given: int,
) -> Averages:
    """The averages of ``EMA(average=..., window=..., window_blocks=...)``.

    ``rates_given``: how many exponential rates were passed explicitly (``half_life``, ``smoothing``, ``decay``,
    ``schedule``), 0 when none was. Without ``average``, the EMA keeps an exponential average per rate (the default
    half-life when none is given and no window is) and then a windowed one per window. ``average`` lists the kinds in
    order instead: ``"uniform"``, ``["exponential", "uniform"]``; its ``"exponential"`` entries take the rates (the
    default half-life when none was given and one is asked for), its ``"window"`` entries the windows.

    Example::

        >>> parse_averages("uniform", None, 4, 0).kinds
        ('uniform',)
        >>> parse_averages(None, "1000ba", 4, 1).kinds
        ('exponential', 'window')
    """
    windows = _windows(window)
    if isinstance(window_blocks, bool) or not isinstance(window_blocks, int) or window_blocks < 1:
        raise ValueError(f"window_blocks={window_blocks!r} must be an int >= 1 (the blocks a window is kept in)")
    if average is None:
        exponential = rates_given if rates_given or windows else 1  # the default half-life
        return Averages(("exponential",) * exponential + ("window",) * len(windows), windows, window_blocks)
    kinds = (average,) if isinstance(average, str) else tuple(average)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"average={average!r}: each entry must be one of {list(KINDS)}")
    asked = kinds.count("exponential")
    if rates_given and asked != rates_given:
        raise ValueError(
            f"average={average!r} asks for {asked} exponential averages but {rates_given} rates were given "
            "(half_life, smoothing, decay or schedule): one 'exponential' entry per rate"
        )
    if not rates_given and asked > 1:
        raise ValueError(f"average={average!r} asks for {asked} exponential averages: give their half_life list")
    if kinds.count("window") != len(windows):
        raise ValueError(
            f"average={average!r} has {kinds.count('window')} 'window' entries but window={window!r} gives "
            f"{len(windows)}: one entry per window"
        )
    if kinds.count("uniform") > 1:
        raise ValueError(f"average={average!r} repeats 'uniform': every uniform average would be the same")
    return Averages(kinds, windows, window_blocks)


def _windows(window: str | Time | Sequence[str | Time] | None) -> tuple[Time, ...]:
    if window is None:
        return ()
    values: list[Any] = list(window) if isinstance(window, (list, tuple)) else [window]  # each checked below
    windows = tuple(as_time(v, name="window", int_unit=TimeUnit.BATCH) for v in values)
    bad = [w for w in windows if w.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH) or w.value <= 0]
    if bad or not windows:
        raise ValueError(f"window={window!r} must be > 0 in 'ba' or 'ep' (e.g. '1000ba'), or a list of them")
    if len(set(windows)) != len(windows):
        raise ValueError(f"window={window!r} repeats a window: give each once")
    return windows


def check_windows(averages: Averages, update_interval: Time) -> list[int]:
    """Each window's updates per block, checked against ``update_interval``: a window is ``window_blocks`` blocks
    of whole updates (``window = blocks * updates_per_block * update_interval``)."""
    per_block = []
    for window in averages.windows:
        span = update_interval.value * averages.window_blocks
        if window.unit is not update_interval.unit or window.value % span:
            raise ValueError(
                f"window='{window}' must be a multiple of window_blocks={averages.window_blocks} times "
                f"update_interval='{update_interval}' (in its unit): a window is kept as {averages.window_blocks} "
                f"blocks of whole updates, e.g. window='{int(span * max(1, round(window.value / span)))}"
                f"{update_interval.unit.value}'"
            )
        per_block.append(int(window.value // span))
    return per_block
