"""The Hugging Face Trainer's ``fsdp=`` on 2 CPU processes: what really runs (``hf_fsdp_script.py``).

On CPU accelerate does not shard: ``fsdp_version=2`` runs as DDP (``is_fsdp_enabled`` False) and the EMA is the
DDP one, checked against the closed form; ``fsdp_version=1`` is refused by accelerate when the Trainer is built.
``tests/gpu/test_hf_fsdp2.py`` runs the same script on CUDA, where FSDP2 really shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchrun import torchrun

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = Path(__file__).with_name("hf_fsdp_script.py")


@pytest.mark.parametrize("version", [2, 1], ids=["fsdp2-runs-ddp", "fsdp1-refused"])
def test_fsdp_on_cpu_is_not_fsdp_and_says_what_it_is(tmp_path, version):
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))  # the emakit under test
    result = torchrun(SCRIPT, str(version), str(tmp_path), timeout=120, PYTHONPATH=path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
