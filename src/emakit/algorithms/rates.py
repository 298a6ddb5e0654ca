"""Moved to :mod:`emakit.ema.rates`: the averages' smoothings belong to the EMA by hand. This path still works."""

from emakit.ema.rates import (
    HALF_LIFE_UNITS,
    INITIAL_SHARE_WARNING,
    Rates,
    parse_rates,
    run_length_warning,
    smoothings_for_run,
)

__all__ = [
    "HALF_LIFE_UNITS",
    "INITIAL_SHARE_WARNING",
    "Rates",
    "parse_rates",
    "run_length_warning",
    "smoothings_for_run",
]
