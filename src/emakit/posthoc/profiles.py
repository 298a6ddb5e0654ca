"""Power-function EMA profiles (EDM2): ``sigma_rel`` and ``gamma``, their inner products, the mix of snapshots.

At time ``t`` a power-function EMA weighs the weights of time ``tau <= t`` by ``tau ** gamma``; its relative
width is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``. The inner product of two
normalised profiles has a closed form, so the mix of snapshots closest to any other profile solves a small
linear system.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["gamma_from_sigma_rel", "sigma_rel_from_gamma", "snapshot_coefficients"]


def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the power-function profile ``tau ** gamma`` (EDM2, Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel``: the largest real root of EDM2's cubic (Eq. 126).

    ``sigma_rel_from_gamma`` falls from 0.2887 at ``gamma = 0`` towards 0, so the root is found by
    bisection on ``gamma >= 0``, to float precision.

    Example::

        >>> round(gamma_from_sigma_rel(0.10), 2)
        6.94
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < 0.2886:
        raise ValueError(f"sigma_rel={sigma_rel!r} must be a number in (0, 0.2886), e.g. 0.05 or 0.10")
    low, high = 0.0, 1.0
    while sigma_rel_from_gamma(high) > sigma_rel:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sigma_rel_from_gamma(middle) > sigma_rel else (low, middle)
    return (low + high) / 2


def _profile_products(t_a: torch.Tensor, g_a: torch.Tensor, t_b: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """The inner products of normalised power-function profiles (EDM2, Eq. 151), pairwise, in float64.

    ``<p_a, p_b> = (g_a + 1)(g_b + 1) (t_a / t_b) ** e / ((g_a + g_b + 1) max(t_a, t_b))``, ``e`` being
    ``g_b`` where ``t_a < t_b``, else ``-g_a``.
    """
    t_a, g_a, t_b, g_b = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    exponent = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** exponent / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def snapshot_coefficients(times: Sequence[float], gammas: Sequence[float], at: float, gamma: float) -> torch.Tensor:
    """The mix of snapshots (taken at ``times`` with exponents ``gammas``) closest to the profile ``(at, gamma)``.

    Solves ``A x = b`` in least squares, ``A`` holding the snapshots' profile products and ``b`` their
    products with the target (EDM2, Algorithm 3), in float64; then normalises ``x`` to sum to one.
    """
    t = torch.tensor(times, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = _profile_products(t, g, t, g)
    b = _profile_products(
        t, g, torch.tensor([float(at)], dtype=torch.float64), torch.tensor([gamma], dtype=torch.float64)
    )
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    return x / x.sum()
