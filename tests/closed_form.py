"""The EMA's closed form, for tests to compare against."""

from __future__ import annotations

import torch


class ClosedForm:
    """The EMA recurrence in float64: the first event copies, later ones ``s * ema + (1 - s) * w``."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.ema: dict[str, torch.Tensor] | None = None

    def update(self, weights: dict[str, torch.Tensor]) -> None:
        s = self.smoothing
        weights = {k: w.double() if w.is_floating_point() else w for k, w in weights.items()}
        if self.ema is None:
            self.ema = dict(weights)
        else:
            self.ema = {k: s * self.ema[k] + (1 - s) * weights[k] for k in weights}
