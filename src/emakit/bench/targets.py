"""The issue's targets: a bound on each measured ratio, and whether a measurement meets it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ATTACH_MEMORY", "AVERAGE_KIND", "EMA_SHARE", "EVAL_MEMORY", "RANK_BYTES", "SEVERAL", "SWAP_DEFAULT",
    "SWAP_FLATTEN", "UPDATE", "Target",
]  # fmt: skip


@dataclass(frozen=True)
class Target:
    """``label op limit``, e.g. ``x lerp >= 0.85``."""

    label: str
    op: str  # "<=" or ">="
    limit: float

    def __str__(self) -> str:
        return f"{self.label} {self.op} {self.limit:g}"

    def passes(self, value: float | None) -> bool | None:
        """Whether ``value`` meets the target; None when there is no value (a peer that did not import)."""
        if value is None:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def judge(self, value: float | None) -> dict[str, bool | None]:
        """``{"label op limit": pass}``, for a row's ``targets`` in the JSON."""
        return {str(self): self.passes(value)}


# update speed: (layout, implementation) -> (the row's key of the measured ratio, target)
UPDATE: dict[tuple[str, str], tuple[str, Target]] = {
    ("convnet", "emakit.EMA"): ("roofline_ratio", Target("x lerp", ">=", 0.85)),
    ("many_small", "emakit.EMA"): ("vs_fastest_peer", Target("/fastest peer", ">=", 2)),
    ("convnet", "emakit.EMA(flatten_model)"): ("roofline_ratio", Target("x lerp", ">=", 0.93)),
    ("many_small", "emakit.EMA(flatten_model)"): ("roofline_ratio", Target("x lerp", ">=", 0.5)),
}
SWAP_FLATTEN = Target("flatten_model / one copy", "<=", 0.1)  # swap in + out, every layout
SWAP_DEFAULT = Target("default / torch_ema", "<=", 2)
# every layout: the default mode holds the average and a parked copy of the training weights (the price of a swap
# that never writes the average and checks every byte); flatten_model exchanges storage pointers
EVAL_MEMORY = {
    "default": Target("extra / model bytes", "<=", 2.1),
    "flatten_model": Target("extra / model bytes", "<=", 1.3),
}
ATTACH_MEMORY = Target("peak / model bytes", "<=", 2.1)  # both modes
EMA_SHARE = Target("time in EMA", "<=", 0.03)
RANK_BYTES = Target("sharded / whole bytes per rank", "<=", 0.51)  # 2 ranks: half, + 1% for shards' padding
SEVERAL = Target("3 averages / one", "<=", 2.6)  # flatten_model: three averages by compile_update / one average
AVERAGE_KIND = Target("/ one exponential", "<=", 1.1)  # a uniform or windowed average's update
