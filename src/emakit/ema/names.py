"""The names of an :class:`~emakit.EMA`'s averages (:attr:`~EMANames.labels`) and of the EMA itself (its repr)."""

from __future__ import annotations

from collections.abc import Callable

from emakit.ema.averages import Averages
from emakit.time import Time

__all__ = ["EMANames"]


class EMANames:
    """:class:`~emakit.EMA`'s :attr:`labels`, :attr:`exponential_labels`, :attr:`label` and repr."""

    schedules: tuple[Callable[[int], float], ...] | None
    half_lives: tuple[Time, ...] | None
    half_life: Time | None
    smoothings: tuple[float, ...] | None
    smoothing: float | None
    averages: Averages
    update_interval: Time
    ema_start: Time

    def __repr__(self) -> str:
        if self.schedules is not None:
            rate = f"schedule={self.schedules[0] if len(self.schedules) == 1 else list(self.schedules)!r}"
        elif self.half_lives is not None:
            rate = "half_life=" + (
                f"'{self.half_life}'" if len(self.half_lives) == 1 else str(tuple(map(str, self.half_lives)))
            )
        elif self.smoothings:
            rate = f"smoothing={self.smoothing if len(self.smoothings) == 1 else self.smoothings}"
        else:
            rate = ""
        if self.averages.kinds != ("exponential",) * len(self.averages.kinds):
            kinds = self.averages.kinds
            rate += f"{', ' if rate else ''}average={kinds[0] if len(kinds) == 1 else list(kinds)!r}"
        if self.averages.windows:
            windows = [str(w) for w in self.averages.windows]
            blocks = self.averages.window_blocks
            rate += f", window={windows[0] if len(windows) == 1 else windows!r}, window_blocks={blocks}"
        return f"EMA({rate}, update_interval='{self.update_interval}', ema_start='{self.ema_start}')"

    @property
    def labels(self) -> list[str]:
        """A short name per average: ``"ema@50ba"``, or ``"ema@0.999"`` when given by its smoothing; ``"uniform"``
        and ``"window@1000ba"`` for the others (:mod:`emakit.ema.averages`)."""
        return self.averages.labels(self.exponential_labels)

    @property
    def exponential_labels(self) -> list[str]:
        """The :attr:`labels` of the exponential averages."""
        if self.schedules is not None:
            names = [getattr(f, "label", None) or getattr(f, "__name__", "schedule") for f in self.schedules]
            unique = len(set(names)) == len(names)
            return [f"ema@{name}" if unique else f"ema@{name}#{i}" for i, name in enumerate(names)]
        if self.half_lives is not None:
            return [f"ema@{h}" for h in self.half_lives]
        return [f"ema@{s:g}" for s in self.smoothings or ()]

    @property
    def label(self) -> str:
        """The first average's :attr:`labels` entry."""
        return self.labels[0]
