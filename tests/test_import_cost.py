"""``import emakit`` costs little above ``import torch``: DTensor support (and sympy behind it), DeepSpeed, the
trainer, tqdm and the data-loading helpers are imported on first use, not by ``import emakit`` (what ``import torch``
itself loads is not counted)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch
after_torch = time.perf_counter()
with_torch = set(sys.modules)
import emakit
from emakit import EMA, PostHocEMA, functional, update_bn
after_emakit = time.perf_counter()
heavy = ["torch.distributed.tensor", "sympy", "tqdm", "emakit.trainer", "emakit.distributed.data", "deepspeed"]
loaded_before_use = [name for name in heavy if name in set(sys.modules) - with_torch]
from emakit import Trainer, distributed
print(json.dumps({
    "emakit_s": after_emakit - after_torch,
    "loaded_before_use": loaded_before_use,
    "lazy_resolve": [Trainer.__name__, distributed.__name__, distributed.EvalShardSampler.__name__],
}))
"""


def test_import_emakit_leaves_heavy_modules_until_they_are_used():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded_before_use"] == [], "imported by `import emakit` though nothing used them yet"
    assert report["lazy_resolve"] == ["Trainer", "emakit.distributed", "EvalShardSampler"]
    # RESULTS.md reports the cost (about 0.1 s on 2 cores); the bound here is generous: shared machines are noisy
    assert report["emakit_s"] < 1.5, report
