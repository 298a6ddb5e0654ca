"""Moved to :mod:`emakit.posthoc`; ``from emakit.algorithms.posthoc import PostHocEMA, synthesize`` still works."""

from emakit.posthoc import (
    PostHocEMA,
    add_arguments,
    gamma_from_sigma_rel,
    run,
    sigma_rel_from_gamma,
    snapshot_coefficients,
    snapshots_in,
    synthesize,
)

__all__ = [
    "PostHocEMA",
    "add_arguments",
    "gamma_from_sigma_rel",
    "run",
    "sigma_rel_from_gamma",
    "snapshot_coefficients",
    "snapshots_in",
    "synthesize",
]
