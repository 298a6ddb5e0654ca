"""Training time: units, time strings such as ``"50ba"`` or ``"0.5dur"``, and the trainer's clock.

A :class:`Time` is a number and a :class:`TimeUnit`. Every unit counts whole things except
``dur``, which is a fraction of the run's ``max_duration`` in [0, 1]::

    >>> Time.from_timestring("50ba")
    Time(50, TimeUnit.BATCH)
    >>> Time.from_timestring("3e4tok").value
    30000
    >>> Time.from_timestring("0.5dur")
    Time(0.5, TimeUnit.DURATION)

A :class:`Timestamp` is the trainer's clock: how many batches, epochs, samples and tokens
have been completed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from fractions import Fraction

__all__ = ["Time", "TimeUnit", "Timestamp", "as_interval", "as_time"]


class TimeUnit(str, enum.Enum):
    """The units of training time, by their time-string suffix."""

    BATCH = "ba"
    EPOCH = "ep"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"

    def __repr__(self) -> str:
        return f"TimeUnit.{self.name}"


_ALLOWED = ", ".join(f"'{u.value}'" for u in TimeUnit)
_DIGITS = r"[0-9](?:_?[0-9])*"  # as in Python numbers: an underscore only between two digits, "4_000"
_NUMBER = rf"(?:{_DIGITS})?\.?{_DIGITS}(?:[eE][+-]?{_DIGITS})?|{_DIGITS}\."
_TIMESTRING = re.compile(rf"^\s*({_NUMBER})\s*([a-z]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Time:
    """An amount of training time: ``value`` in ``unit``.

    ``value`` is an ``int`` for every unit but :attr:`TimeUnit.DURATION`, whose value is a
    ``float`` in [0, 1] (the fraction of ``max_duration``).

    Example::

        >>> Time(2, "ep") == Time.from_timestring("2ep")
        True
    """

    value: int | float
    unit: TimeUnit

    def __init__(self, value: int | float, unit: TimeUnit | str) -> None:
        try:
            unit = TimeUnit(unit)
        except ValueError:
            raise ValueError(f"unknown time unit {unit!r}: allowed units are {_ALLOWED}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"time value {value!r} must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"time value {value!r} must be a finite number")
        if value < 0:
            raise ValueError(f"time value {value!r}{unit.value} must not be negative")
        if unit is TimeUnit.DURATION:
            if value > 1:
                raise ValueError(f"time value {value!r}dur must lie in [0, 1] (a fraction of max_duration)")
            value = float(value)
        else:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"time value {value!r}{unit.value} must be a whole number of '{unit.value}'")
            value = int(value)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "unit", unit)

    @classmethod
    def from_timestring(cls, timestring: str) -> Time:
        """Parse ``"<number><unit>"``, e.g. ``"50ba"``, ``"1ep"``, ``"0.5dur"``, ``"3e4tok"``, ``"4_000tok"``.

        Numbers are written as in Python: digits may be grouped with single underscores between them.

        Raises:
            ValueError: naming the string and the allowed units when it does not parse, or when
                the value is not allowed for the unit (fractional batches, ``dur`` above 1).
        """
        if not isinstance(timestring, str):
            raise ValueError(f"time string must be a str such as '50ba' (units {_ALLOWED}), got {timestring!r}")
        match = _TIMESTRING.match(timestring)
        if match is None or match.group(2) not in {u.value for u in TimeUnit}:
            raise ValueError(
                f"invalid time string {timestring!r}: expected a number followed by one of the units "
                f"{_ALLOWED}, e.g. '50ba', '1ep', '0.5dur'"
            )
        number, unit = match.groups()
        number = number.replace("_", "")
        exact = Fraction(number)  # exact for '9007199254740993tok' and '3e4tok' alike
        whole = exact.denominator == 1 and unit != TimeUnit.DURATION.value
        value = int(exact) if whole else float(number)
        try:
            return cls(value, unit)
        except ValueError as error:
            raise ValueError(f"invalid time string {timestring!r} (units {_ALLOWED}): {error}") from None

    def __repr__(self) -> str:
        return f"Time({self.value!r}, {self.unit!r})"

    def __str__(self) -> str:
        return f"{self.value}{self.unit.value}"

    def _check_unit(self, other: Time) -> None:
        if not isinstance(other, Time):
            raise TypeError(f"cannot combine Time with {type(other).__name__}")
        if other.unit is not self.unit:
            raise ValueError(f"cannot combine {self} and {other}: units differ")

    def __lt__(self, other: Time) -> bool:
        self._check_unit(other)
        return self.value < other.value

    def __le__(self, other: Time) -> bool:
        self._check_unit(other)
        return self.value <= other.value

    def __add__(self, other: Time) -> Time:
        self._check_unit(other)
        return Time(self.value + other.value, self.unit)


def as_time(value: str | int | Time, *, name: str, int_unit: TimeUnit | None = None) -> Time:
    """``value`` as a :class:`Time`: a time string, a :class:`Time`, or an int in ``int_unit``.

    ``name`` is the argument's name, used in the error message.
    """
    if isinstance(value, Time):
        return value
    if isinstance(value, str):
        try:
            return Time.from_timestring(value)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    if int_unit is not None and isinstance(value, int) and not isinstance(value, bool):
        try:
            return Time(value, int_unit)
        except ValueError as error:
            raise ValueError(f"{name}={value!r}: {error}") from None
    allowed = "a time string such as '50ba' or a Time" + (f", or an int of '{int_unit.value}'" if int_unit else "")
    raise ValueError(f"{name}={value!r} is not a time: expected {allowed}")


def as_interval(
    value: str | int | Time,
    *,
    name: str,
    units: tuple[TimeUnit, ...] = (TimeUnit.BATCH, TimeUnit.EPOCH),
    int_unit: TimeUnit | None = None,
    examples: tuple[str, ...] = ("1ba",),
) -> Time:
    """``value`` as how often something happens: a :class:`Time` above 0 in one of ``units`` (batches or epochs).

    ``value`` is read as by :func:`as_time` (an int in ``int_unit``, when given). Raises ValueError naming
    ``name``, the value, the allowed units and ``examples``, e.g. ``save_interval='0ba' must be > 0 and in 'ba'
    or 'ep', e.g. '1ep' or '100ba'``.
    """
    interval = as_time(value, name=name, int_unit=int_unit)
    if interval.unit not in units or interval.value <= 0:
        allowed = " or ".join(f"'{unit.value}'" for unit in units)
        shown = " or ".join(f"'{example}'" for example in examples)
        raise ValueError(f"{name}={value!r} must be > 0 and in {allowed}, e.g. {shown}")
    return interval


@dataclasses.dataclass
class Timestamp:
    """The trainer's clock: completed batches, epochs, samples and tokens."""

    batch: int = 0
    epoch: int = 0
    sample: int = 0
    token: int = 0
    batch_in_epoch: int = 0

    def get(self, unit: TimeUnit | str) -> int:
        """The count in ``unit`` (``ba``, ``ep``, ``sp`` or ``tok``)."""
        unit = TimeUnit(unit)
        if unit is TimeUnit.DURATION:
            raise ValueError("a Timestamp counts ba, ep, sp and tok; 'dur' needs the run's max_duration")
        return {
            TimeUnit.BATCH: self.batch,
            TimeUnit.EPOCH: self.epoch,
            TimeUnit.SAMPLE: self.sample,
            TimeUnit.TOKEN: self.token,
        }[unit]

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))
