"""EDM2's post-hoc EMA written out independently of emakit, in float64, for tests to compare against.

Nothing here imports emakit: the exponent comes from EDM2's cubic (Karras et al. 2024, Eq. 126), the average
from the power-function EMA's per-update factor, the snapshot mix from the inner products of normalised
power-function profiles (Eq. 151) solved by numpy's least squares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

# EDM2, Table 1 (sigma_rel -> gamma), to two decimals, for checking the cubic below.
EDM2_GAMMAS = {0.05: 16.97, 0.10: 6.94, 0.15: 3.56, 0.20: 1.83}


def gamma_of(sigma_rel: float) -> float:
    """The largest real root of ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2)``."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_coefficients(times: Sequence[int], gamma: float) -> torch.Tensor:
    """The weight of the model's weights at each update step ``times[k]`` in the power-function EMA after the last.

    Update ``k`` (at step ``t_k``, ``dt_k = t_k - t_(k-1)``, ``t_0 = 0``) is ``ema = beta_k ema + (1 - beta_k) w``
    with ``beta_k = (1 - dt_k / t_k) ** (gamma + 1)`` (``beta_1 = 0``: the first update copies). Unrolled, ``w`` of
    step ``t_k`` weighs ``(1 - beta_k) * prod_(j > k) beta_j``, which telescopes to
    ``(t_k ** (gamma + 1) - t_(k-1) ** (gamma + 1)) / t_n ** (gamma + 1)``. Computed from the betas, in float64.
    """
    t = torch.tensor([float(x) for x in times], dtype=torch.float64)
    dt = t - torch.cat([torch.zeros(1, dtype=torch.float64), t[:-1]])
    beta = (1 - dt / t) ** (gamma + 1)
    later = torch.cat(
        [torch.flip(torch.cumprod(torch.flip(beta[1:], [0]), 0), [0]), torch.ones(1, dtype=torch.float64)]
    )
    return (1 - beta) * later


def power_ema(history: Mapping[int, Mapping[str, torch.Tensor]], times: Sequence[int], gamma: float) -> dict:
    """The power-function EMA, in float64, of the weights ``history[t]`` updated at the steps ``times``.

    Floating-point tensors are averaged by :func:`power_ema_coefficients`; others (integer buffers, copied at every
    update) are those of the last update.
    """
    coefficients = power_ema_coefficients(times, gamma)
    last = history[times[-1]]
    average = {}
    for key, value in last.items():
        if not value.is_floating_point():
            average[key] = value.clone()
            continue
        stacked = torch.stack([history[t][key].to(torch.float64) for t in times])
        average[key] = torch.tensordot(coefficients, stacked, dims=1)
    return average


def profile_product(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """``integral p_a p_b`` of the normalised profiles ``p(tau) = (g + 1) tau**g / t**(g + 1)`` on ``(0, t]``.

    Both are zero past their ``t``, so the integral runs to ``m = min(t_a, t_b)``:
    ``(g_a + 1)(g_b + 1) m ** (g_a + g_b + 1) / ((g_a + g_b + 1) t_a ** (g_a + 1) t_b ** (g_b + 1))`` (EDM2, Eq. 151),
    evaluated in logarithms so that large steps do not overflow.
    """
    m = min(t_a, t_b)
    log = (
        np.log(g_a + 1)
        + np.log(g_b + 1)
        + (g_a + g_b + 1) * np.log(m)
        - np.log(g_a + g_b + 1)
        - (g_a + 1) * np.log(t_a)
        - (g_b + 1) * np.log(t_b)
    )
    return float(np.exp(log))


def snapshot_mix(times: Sequence[float], gammas: Sequence[float], at: float, gamma: float) -> np.ndarray:
    """The least-squares mix of the snapshot profiles ``(times[i], gammas[i])`` closest to the profile ``(at, gamma)``.

    Solves ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, with numpy's ``lstsq`` in float64, and
    scales ``x`` to sum to one (as emakit documents for ``synthesize``: a mix of averages stays an average).
    """
    n = len(times)
    a = np.array([[profile_product(times[i], gammas[i], times[j], gammas[j]) for j in range(n)] for i in range(n)])
    b = np.array([profile_product(times[i], gammas[i], at, gamma) for i in range(n)])
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def mixed(averages: Sequence[Mapping[str, torch.Tensor]], x: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i x_i averages[i]`` per floating-point key, in float64; other keys from the last average."""
    out = {}
    for key, value in averages[-1].items():
        if not value.is_floating_point():
            out[key] = value
            continue
        out[key] = sum(float(c) * a[key].to(torch.float64) for c, a in zip(x, averages))
    return out
