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


def uniform_mean(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average (SWA) of every floating-point tensor over ``history``, in float64."""
    return {
        k: sum(h[k].double() for h in history) / len(history) for k in history[0] if history[0][k].is_floating_point()
    }


def window_mean(history: list[dict[str, torch.Tensor]], per_block: int, blocks: int) -> dict[str, torch.Tensor]:
    """A windowed average after ``history``, by its definition (``emakit.ema.window``), in float64: the uniform
    average of the last ``blocks`` completed blocks of ``per_block`` updates, or of everything before the first
    block completes."""
    completed = len(history) // per_block
    if completed == 0:
        return uniform_mean(history)
    return uniform_mean(history[max(0, completed - blocks) * per_block : completed * per_block])
