"""The random generators a run depends on: seeding them, and their states for exact resume."""

from __future__ import annotations

import contextlib
import random
from typing import Any, cast

import torch

__all__ = ["rng_state", "seed_everything", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy, torch, CUDA), as plain values a checkpoint can hold."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        # legacy=True (the default) gives a tuple; numpy's stubs pick their legacy=False overload (a dict)
        legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        kind, keys, pos, has_gauss, gauss = legacy
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
