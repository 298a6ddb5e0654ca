"""The measurements, one module per seam, re-exported here: what ``emakit bench`` measures and where it lives.

- :mod:`~emakit.bench.timing`: the round-robin timer, the rooflines, the sizes ratios are taken against.
- :mod:`~emakit.bench.updates`: update time against the roofline and the peers.
- :mod:`~emakit.bench.swap`: swap time against one copy of the weights and torch_ema's swap.
- :mod:`~emakit.bench.memory`: the extra bytes during a Trainer evaluation; the peak of attaching an EMA.
- :mod:`~emakit.bench.training`: the Trainer's wall time with an EMA every batch against without.
"""

from __future__ import annotations

from emakit.bench.memory import EVAL_WINDOW, attach_peaks, bench_attach_memory, bench_eval_memory, peak_in_window
from emakit.bench.peers import MODES
from emakit.bench.swap import bench_swap
from emakit.bench.timing import averaged_numel, model_bytes, rooflines, time_round_robin
from emakit.bench.training import bench_trainer
from emakit.bench.updates import bench_updates

__all__ = [
    "EVAL_WINDOW",
    "MODES",
    "attach_peaks",
    "averaged_numel",
    "bench_attach_memory",
    "bench_eval_memory",
    "bench_swap",
    "bench_trainer",
    "bench_updates",
    "model_bytes",
    "peak_in_window",
    "rooflines",
    "time_round_robin",
]
