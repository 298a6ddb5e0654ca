"""Tensors emakit does not understand are refused at the first update, naming the tensor and the engine — never
averaged as the empty placeholders some engines leave in the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrun import torchrun

from emakit import EMA, distributed
from emakit.functional import compute_ema
from emakit.storage.unsupported import UnsupportedTensorError

SCRIPT = Path(__file__).with_name("unsupported_script.py")


class Placeholder(nn.Module):
    """An engine that keeps ``weight``'s data elsewhere: the parameter is empty, ``state_dict()`` holds the data."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.zeros(3))
        self.elsewhere = torch.ones(4, 3)
        self._register_state_dict_hook(Placeholder._full)

    @staticmethod
    def _full(module: Placeholder, state: dict, prefix: str, local_metadata: dict) -> None:
        state[prefix + "weight"] = module.elsewhere


def test_an_empty_parameter_whose_state_dict_entry_is_larger_is_refused_by_name():
    model = Placeholder()
    with pytest.raises(UnsupportedTensorError, match=r"'weight' is an empty placeholder .* holds 12 elements"):
        EMA(half_life="3ba").update(model)
    with pytest.raises(ValueError, match="'weight' is an empty placeholder"):  # a ValueError, for those who catch one
        compute_ema(model, Placeholder())


def test_genuinely_empty_tensors_are_averaged_as_they_are():
    model = nn.Linear(0, 3)  # weight of shape (3, 0): empty in the module and in its state_dict
    ema = EMA(half_life="3ba")
    ema.update(model)
    ema.update(model)
    assert ema.ema_state_dict()["weight"].shape == (3, 0)


@pytest.mark.skipif(
    distributed.TORCH_VERSION < distributed.FSDP_ON_CPU_SINCE, reason="FSDP on CPU (gloo) needs torch >= 2.9"
)
def test_fsdp1_models_it_cannot_follow_and_dtensors_off_a_1d_shard_or_replicate_layout_are_refused_by_name():
    """FSDP1 is averaged given its root wrapper (tests/test_fsdp1_ema.py, which also checks the refusals that need 2
    ranks); given the root's ``.module`` (its own unit's handle out of reach) it is refused, naming what to pass."""
    result = torchrun(SCRIPT, nproc=1, timeout=110)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = dict(re.findall(r"^([\w-]+): (.*)$", result.stdout, flags=re.MULTILINE))
    assert cases["fsdp1-wrapper-origFalse-ok"] == cases["fsdp1-wrapper-origTrue-ok"] == "NONE"
    assert cases["fsdp1-inner-origFalse"].startswith("'_flat_param' is an FSDP1 FlatParameter")
    assert cases["fsdp1-inner-origTrue"].startswith("'0.weight' is a view into an FSDP1 FlatParameter")
    for case in ("fsdp1-inner-origFalse", "fsdp1-inner-origTrue"):
        assert "pass the FSDP-wrapped model itself (the root FullyShardedDataParallel module)" in cases[case]
    assert cases["dtensor-2d"].startswith("'weight' is a DTensor on a 2-D device mesh (1, 1) placed (Replicate(),")
    assert "placed (Partial(sum),)" in cases["dtensor-partial"]
    assert "1-D mesh placed Shard(dim) or Replicate()" in cases["dtensor-partial"]
    assert cases["dtensor-shard-ok"] == "NONE"
