"""An EMA of a torch FSDP1 model (``FullyShardedDataParallel``, ``use_orig_params`` True and False) by hand, in 2
processes on CPU (gloo, ``device_id=cpu``), against the float64 closed form of the full weights: see
``fsdp1_ema_script.py`` for what each run checks.

``examples/fsdp1.py`` (the runnable example of ``docs/integrations/fsdp1.md``) is run and resumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from torchrun import torchrun

from emakit import distributed
from emakit.export import save_ema_state

SCRIPT = Path(__file__).with_name("fsdp1_ema_script.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp1.py"

pytestmark = pytest.mark.skipif(
    distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE, reason="FSDP on CPU (gloo) needs torch >= 2.9"
)


@pytest.mark.parametrize("orig", ["false", "true"], ids=["flat-params", "use-orig-params"])
def test_ema_of_an_fsdp1_model_follows_the_closed_form_without_communication(tmp_path, orig):
    result = torchrun(SCRIPT, orig, str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    assert result.stdout.count("of the parameters' unsharded bytes") == 2
    assert result.stdout.count("swap left inside summon_full_params: the EMA cannot write into") == 2
    for mode in ("SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD 2x1", "HYBRID_SHARD 1x2", "mixed precision"):
        assert result.stdout.count(f": {mode}: {{'engine': 'fsdp1'") == 2, (mode, result.stdout[-3000:])


def test_the_documented_example_resumes_its_ema_bit_for_bit(tmp_path):
    """``examples/fsdp1.py`` (``use_orig_params=True``): 20 steps at once, and 10 then resumed from its checkpoint to
    20, end with the same EMA shards on every rank and the same exported file, bit for bit; the evaluation inside
    ``ema_weights`` and the plain model holding the exported average print the same loss."""
    runs = {"whole": ["--steps", "20"], "first": ["--steps", "10"], "resumed": ["--steps", "20", "--resume"]}
    outputs = {}
    for run, args in runs.items():
        out = tmp_path / ("whole" if run == "whole" else "split")
        result = torchrun(EXAMPLE, "--use-orig-params", *args, "--out", str(out), timeout=100)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        outputs[run] = result.stdout
    assert "step 20: eval loss" in outputs["whole"]
    swapped = outputs["whole"].split("step 20: eval loss")[1].split(" (EMA)")[0].split(", ")[1]
    assert f"plain model with the EMA weights: eval loss {swapped}" in outputs["whole"]
    for rank in (0, 1):
        whole, split = (
            torch.load(tmp_path / run / "checkpoint" / f"rank{rank}.pt", weights_only=True)["ema"]
            for run in ("whole", "split")
        )
        assert whole["partitioning"] == {"engine": "fsdp1", "rank": rank, "world_size": 2}
        assert whole["num_updates"] == split["num_updates"] == 20
        assert whole["weights"].keys() == split["weights"].keys()
        for name, value in whole["weights"].items():
            assert torch.equal(split["weights"][name], value), name
    exported = [safetensors.torch.load_file(tmp_path / run / "ema.safetensors") for run in ("whole", "split")]
    assert exported[0].keys() == exported[1].keys() == set(make_plain_keys())
    assert all(torch.equal(exported[0][name], exported[1][name]) for name in exported[0])


def make_plain_keys() -> list[str]:
    return [f"{layer}.{kind}" for layer in (0, 2, 4) for kind in ("weight", "bias")]


def test_a_state_of_one_ranks_shards_is_not_exported_as_a_model(tmp_path):
    """``emakit export``'s path writes whole tensors from a state: one rank's FSDP1 (or ZeRO-3) shards are refused,
    naming the way (``save_ema_weights`` on every rank), not written as a model's weights."""
    state = {
        "started": True,
        "weights": {"_fsdp_wrapped_module.0.weight": torch.zeros(8)},  # rank 0's slice of a (4, 4) weight
        "state_dict_keys": {"0.weight": "_fsdp_wrapped_module.0.weight"},
        "partitioning": {"engine": "fsdp1", "rank": 0, "world_size": 2},
    }
    with pytest.raises(ValueError, match=r"fsdp1 shards of rank 0 of 2 only: call ema.save_ema_weights\(path\)"):
        save_ema_state(state, tmp_path / "ema.safetensors")
    assert not (tmp_path / "ema.safetensors").exists()
