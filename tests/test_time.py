"""Time, TimeUnit, Time.from_timestring, Timestamp and as_interval: parsing, value types, errors, arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit import Time, Timestamp, TimeUnit
from emakit.time import as_interval

ALL_UNITS = ("ba", "ep", "sp", "tok", "dur")
WHOLE_UNITS = ("ba", "ep", "sp", "tok")


def assert_names_string_and_units(error: pytest.ExceptionInfo, text: object) -> None:
    message = str(error.value)
    assert repr(text) in message or str(text) in message, message
    for unit in ALL_UNITS:
        assert f"'{unit}'" in message, f"allowed unit {unit!r} missing from: {message}"


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("50ba", 50, TimeUnit.BATCH),
        ("1ep", 1, TimeUnit.EPOCH),
        ("0.5dur", 0.5, TimeUnit.DURATION),
        ("3e4tok", 30000, TimeUnit.TOKEN),
        ("1000sp", 1000, TimeUnit.SAMPLE),
        ("0ba", 0, TimeUnit.BATCH),
        ("1dur", 1.0, TimeUnit.DURATION),
        ("0dur", 0.0, TimeUnit.DURATION),
        ("0.0dur", 0.0, TimeUnit.DURATION),
        ("2.0ep", 2, TimeUnit.EPOCH),
        ("1E3ba", 1000, TimeUnit.BATCH),
        ("2.5e1sp", 25, TimeUnit.SAMPLE),
    ],
)
def test_from_timestring_parses_every_unit(text: str, value: float, unit: TimeUnit) -> None:
    time = Time.from_timestring(text)
    assert time.value == value
    assert time.unit is unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4_000tok", Time(4000, "tok")),
        ("3_0e10sp", Time(300_000_000_000, "sp")),
        ("1_000_000ba", Time(1_000_000, "ba")),
        ("0.2_5dur", Time(0.25, "dur")),
        ("1e1_0tok", Time(10**10, "tok")),
    ],
)
def test_digits_may_be_grouped_with_underscores_as_in_python(text: str, expected: Time) -> None:
    parsed = Time.from_timestring(text)
    assert parsed == expected
    assert type(parsed.value) is type(expected.value)
    assert parsed.value == float(text[: -len(expected.unit.value)])  # Python reads the number the same way


@pytest.mark.parametrize("text", [" 50ba", "50ba ", "  50 ba  ", "\t50ba\n", "50 ba"])
def test_from_timestring_ignores_surrounding_and_inner_whitespace(text: str) -> None:
    assert Time.from_timestring(text) == Time(50, TimeUnit.BATCH)


@pytest.mark.parametrize("text", ["50ba", "1ep", "3e4tok", "1000sp", "2.0ep", "1e1ba"])
def test_whole_units_give_int_values(text: str) -> None:
    assert type(Time.from_timestring(text).value) is int


@pytest.mark.parametrize("text", ["0.5dur", "1dur", "0dur"])
def test_duration_gives_float_values(text: str) -> None:
    assert type(Time.from_timestring(text).value) is float


def test_time_constructor_accepts_unit_strings_and_normalises_values() -> None:
    assert Time(2, "ep") == Time.from_timestring("2ep")
    assert Time(3.0, "ba").value == 3
    assert type(Time(3.0, "ba").value) is int
    assert type(Time(1, "dur").value) is float
    assert Time(5, "sp").unit is TimeUnit.SAMPLE


def test_time_unit_values_are_the_timestring_suffixes() -> None:
    assert [u.value for u in TimeUnit] == list(ALL_UNITS)
    assert TimeUnit("tok") is TimeUnit.TOKEN


def test_large_whole_values_parse_exactly() -> None:
    # 2**53 + 1 is not representable as a float; the parsed count must still be exact.
    assert Time.from_timestring("9007199254740993tok").value == 9007199254740993
    assert Time.from_timestring(str(Time(10**20 + 1, "tok"))).value == 10**20 + 1


# ------------------------------------------------------------------ rejected strings


@pytest.mark.parametrize(
    "text",
    [
        "50xx",  # unknown unit
        "50",  # no unit
        "50batches",
        "50BA",
        "ba",  # no number
        "",
        "   ",
        "-1ba",  # negative
        "-0.5dur",
        "5ba5",
        "50 ba ep",
        "nanba",
        "infep",
        "0x10ba",
        "1__000ba",  # underscores only singly between digits, as in Python
        "_1000ba",
        "1000_ba",
        "1_.5dur",
        "1e_5tok",
    ],
)
def test_unparseable_timestrings_raise_value_error_naming_string_and_units(text: str) -> None:
    with pytest.raises(ValueError) as error:
        Time.from_timestring(text)
    assert_names_string_and_units(error, text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1.5ba", "whole number"),  # fractional batches
        ("0.5ep", "whole number"),
        ("2.5sp", "whole number"),
        ("1.5e0tok", "whole number"),
        ("1.5dur", r"\[0, 1\]"),  # dur above 1
        ("2dur", r"\[0, 1\]"),
        ("1e400dur", "finite"),  # overflows to inf
    ],
)
def test_values_not_allowed_for_the_unit_raise_value_error_naming_string_and_units(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as error:
        Time.from_timestring(text)
    assert_names_string_and_units(error, text)


@pytest.mark.parametrize("value", [50, 0.5, None, b"50ba", ["50ba"], Time(50, "ba")])
def test_non_string_timestrings_raise_value_error_naming_value_and_units(value: object) -> None:
    with pytest.raises(ValueError) as error:
        Time.from_timestring(value)  # type: ignore[arg-type]
    assert_names_string_and_units(error, value)


@pytest.mark.parametrize(
    ("value", "unit", "fragment"),
    [
        (1, "xx", "unknown time unit"),
        (-1, "ba", "negative"),
        (1.5, "ba", "whole number"),
        (1.5, "dur", r"\[0, 1\]"),
        (float("nan"), "ep", "finite"),
        (float("inf"), "ep", "finite"),
        (True, "ba", "must be a number"),
        ("5", "ba", "must be a number"),
    ],
)
def test_time_constructor_rejects_bad_values(value: object, unit: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Time(value, unit)  # type: ignore[arg-type]


# ------------------------------------------------------------------ comparisons and arithmetic


def test_times_of_one_unit_compare_by_value() -> None:
    one, two = Time(1, "ba"), Time(2, "ba")
    assert one < two
    assert one <= two
    assert one <= Time(1, "ba")
    assert two > one
    assert two >= one
    assert not two < one
    assert one == Time.from_timestring("1ba")
    assert one != Time(1, "ep")
    assert Time(0.25, "dur") < Time(0.5, "dur")


def test_times_are_hashable_and_equal_times_hash_alike() -> None:
    assert len({Time(1, "ba"), Time.from_timestring("1ba"), Time(1.0, "ba"), Time(1, "ep")}) == 2


def test_times_of_one_unit_add() -> None:
    assert Time(2, "ba") + Time(3, "ba") == Time(5, "ba")
    assert Time(0.25, "dur") + Time(0.5, "dur") == Time(0.75, "dur")


def test_comparing_or_adding_times_of_different_units_raises() -> None:
    with pytest.raises(ValueError, match="units differ"):
        Time(1, "ba") < Time(1, "ep")  # noqa: B015
    with pytest.raises(ValueError, match="units differ"):
        Time(1, "ba") + Time(1, "ep")


def test_comparing_or_adding_a_time_and_a_number_raises_type_error() -> None:
    with pytest.raises(TypeError):
        Time(1, "ba") < 2  # type: ignore[operator]  # noqa: B015
    with pytest.raises(TypeError):
        Time(1, "ba") + 2  # type: ignore[operator]


def test_adding_durations_beyond_one_raises() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Time(0.75, "dur") + Time(0.5, "dur")


def test_str_and_repr() -> None:
    assert str(Time(50, "ba")) == "50ba"
    assert str(Time(0.5, "dur")) == "0.5dur"
    assert repr(Time(50, "ba")) == "Time(50, TimeUnit.BATCH)"


# ------------------------------------------------------------------ Timestamp


def test_timestamp_get_returns_each_count() -> None:
    stamp = Timestamp(batch=7, epoch=2, sample=56, token=900, batch_in_epoch=3)
    assert stamp.get("ba") == 7
    assert stamp.get(TimeUnit.EPOCH) == 2
    assert stamp.get("sp") == 56
    assert stamp.get(TimeUnit.TOKEN) == 900


def test_timestamp_get_rejects_duration_and_unknown_units() -> None:
    stamp = Timestamp()
    with pytest.raises(ValueError, match="max_duration"):
        stamp.get("dur")
    with pytest.raises(ValueError):
        stamp.get("xx")


def test_timestamp_state_dict_round_trip() -> None:
    stamp = Timestamp(batch=7, epoch=2, sample=56, token=900, batch_in_epoch=3)
    other = Timestamp()
    other.load_state_dict(stamp.state_dict())
    assert other == stamp


# ------------------------------------------------------------------ properties


@settings(max_examples=300, deadline=None)
@given(value=st.integers(min_value=0), unit=st.sampled_from(WHOLE_UNITS))
def test_whole_times_round_trip_through_str(value: int, unit: str) -> None:
    time = Time(value, unit)
    parsed = Time.from_timestring(str(time))
    assert parsed == time
    assert type(parsed.value) is int


@settings(max_examples=300, deadline=None)
@given(value=st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_durations_round_trip_through_str(value: float) -> None:
    time = Time(value, "dur")
    assert Time.from_timestring(str(time)) == time


_ALPHABET = st.sampled_from([*"0123456789.eE+- \tabdeoprsuktx_", "ba", "ep", "sp", "tok", "dur"])


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(), st.lists(_ALPHABET, max_size=12).map("".join)))
def test_arbitrary_strings_parse_or_raise_value_error(text: str) -> None:
    try:
        time = Time.from_timestring(text)
    except ValueError as error:
        assert repr(text) in str(error)
    else:
        assert time.unit in TimeUnit
        if time.unit is TimeUnit.DURATION:
            assert 0.0 <= time.value <= 1.0
        else:
            assert type(time.value) is int and time.value >= 0


def test_exponent_forms_of_whole_units_parse_exactly() -> None:
    assert Time.from_timestring("1e400ba").value == 10**400
    assert Time.from_timestring("1.5e3sp").value == 1500


# ------------------------------------------------------------------ intervals


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        ("5ba", {}, Time(5, "ba")),
        ("2ep", {}, Time(2, "ep")),
        (Time(3, "ba"), {}, Time(3, "ba")),
        (4, {"int_unit": TimeUnit.EPOCH}, Time(4, "ep")),
        ("1e3ba", {}, Time(1000, "ba")),
        ("7ba", {"units": (TimeUnit.BATCH,)}, Time(7, "ba")),
    ],
)
def test_as_interval_reads_positive_batches_and_epochs(value: object, kwargs: dict, expected: Time) -> None:
    assert as_interval(value, name="every", **kwargs) == expected


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        ("0ba", {}),
        ("0ep", {}),
        (Time(0, "ba"), {}),
        (0, {"int_unit": TimeUnit.EPOCH}),
        ("10sp", {}),
        ("100tok", {}),
        ("0.5dur", {}),
        ("2ep", {"units": (TimeUnit.BATCH,)}),
    ],
)
def test_as_interval_refuses_zero_and_other_units_naming_the_argument(value: object, kwargs: dict) -> None:
    with pytest.raises(ValueError) as error:
        as_interval(value, name="every", **kwargs)
    assert str(error.value).startswith(f"every={value!r} must be > 0 and in 'ba'"), str(error.value)


@pytest.mark.parametrize(
    ("value", "int_unit"),
    [("soon", None), ("-1ba", None), (3, None), (True, TimeUnit.EPOCH), (None, None), (-2, TimeUnit.EPOCH)],
)
def test_as_interval_refuses_what_is_not_a_time_naming_the_argument(value: object, int_unit: TimeUnit | None) -> None:
    with pytest.raises(ValueError) as error:
        as_interval(value, name="every", int_unit=int_unit)
    assert str(error.value).startswith("every"), str(error.value)


def test_as_interval_messages_are_the_trainers_and_the_emas() -> None:
    """The two intervals it stands for keep their messages: the Trainer's (eval/save) and the EMA's update."""
    with pytest.raises(ValueError) as trainer:
        as_interval("0ba", name="save_interval", int_unit=TimeUnit.EPOCH, examples=("1ep", "100ba"))
    assert str(trainer.value) == "save_interval='0ba' must be > 0 and in 'ba' or 'ep', e.g. '1ep' or '100ba'"
    with pytest.raises(ValueError) as ema:
        as_interval("1sp", name="update_interval")
    assert str(ema.value) == "update_interval='1sp' must be > 0 and in 'ba' or 'ep', e.g. '1ba'"
    with pytest.raises(ValueError) as batches:
        as_interval("1ep", name="snapshot_interval", units=(TimeUnit.BATCH,), examples=("100ba",))
    assert str(batches.value) == "snapshot_interval='1ep' must be > 0 and in 'ba', e.g. '100ba'"
