"""``EMA(shard_over_ranks=True)``: each rank of data parallelism keeps and updates 1/N of the average.

Two processes (gloo) run ``shard_over_ranks_script.py`` (by hand, DDP, fp32 and bf16: see its docstring for what
each run checks), ``examples/shard_over_ranks.py`` (emakit's ``Trainer(parallelism="ddp")``: checkpoints hold
every rank's slice and resume bit for bit), Lightning's DDP strategy, the Hugging Face Trainer under DDP, a DeepSpeed
ZeRO-2 engine, and ``emakit bench``'s 2-rank row. One process: without a process group, or on one rank, the average
is whole; what cannot go together is refused.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torchrun import torchrun

from emakit import EMA, distributed
from emakit.cli import main as cli_main

SCRIPT = Path(__file__).with_name("shard_over_ranks_script.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shard_over_ranks.py"
LIGHTNING_SCRIPT = Path(__file__).with_name("shard_over_ranks_lightning_script.py")
HF_SCRIPT = Path(__file__).with_name("shard_over_ranks_hf_script.py")
ZERO_SCRIPT = Path(__file__).with_name("shard_over_ranks_zero_script.py")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_each_rank_keeps_half_of_the_average_and_the_whole_follows_the_closed_form(tmp_path, dtype):
    result = torchrun(SCRIPT, dtype, str(tmp_path), timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    ratios = [float(r) for r in re.findall(r"the average holds ([0-9.]+) of the unsharded bytes", result.stdout)]
    assert len(ratios) == 2 and all(r <= 0.51 for r in ratios), ratios


def test_the_documented_example_resumes_every_ranks_slice_bit_for_bit(tmp_path):
    """``examples/shard_over_ranks.py``: 24 steps at once, and 12 then resumed from the checkpoint to 24, end with the
    same slice on every rank and the same exported file, bit for bit; the evaluation with the average swapped in
    equals a plain model holding the exported file; ``emakit export`` refuses the split checkpoint, saying why."""
    runs = {"whole": ["--steps", "24"], "first": ["--steps", "12"], "resumed": ["--steps", "24"]}
    outputs = {}
    for run, args in runs.items():
        out = tmp_path / ("whole" if run == "whole" else "split")
        result = torchrun(EXAMPLE, *args, "--out", str(out), timeout=110)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        outputs[run] = result.stdout
    swapped = re.search(r"step 24: eval loss with the EMA swapped in ([0-9.]+)", outputs["whole"])
    plain = re.search(r"plain model with the exported EMA weights: eval loss ([0-9.]+)", outputs["whole"])
    assert swapped and plain, outputs["whole"]
    assert abs(float(swapped[1]) - float(plain[1])) < 1e-5, (swapped[1], plain[1])
    assert outputs["whole"].count("(split over ranks: True)") == 2, outputs["whole"]
    checkpoints = [
        torch.load(tmp_path / run / "checkpoints" / "ep1-ba24.pt", weights_only=True) for run in ("whole", "split")
    ]
    states = [c["algorithms"][0]["per_rank_states"] for c in checkpoints]
    assert len(states[0]) == len(states[1]) == 2
    for rank in (0, 1):
        whole, split = states[0][rank], states[1][rank]
        assert whole["partitioning"]["rank"] == rank and whole["partitioning"]["world_size"] == 2
        assert whole["num_updates"] == split["num_updates"] == 24
        for name, value in whole["weights"].items():
            assert torch.equal(split["weights"][name], value), (rank, name)
    exported = [safetensors.torch.load_file(tmp_path / run / "ema.safetensors") for run in ("whole", "split")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][name], exported[1][name]) for name in exported[0])
    with pytest.raises(ValueError, match=r"split over ranks.*save_ema_weights"):
        cli_main(["export", str(tmp_path / "whole" / "checkpoints" / "ep1-ba24.pt"), str(tmp_path / "out.st")])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_without_a_process_group_the_average_is_whole():
    model = _model()
    ema = EMA(smoothing=0.5, shard_over_ranks=True)
    ema.update(model)
    assert not ema.state_is_per_rank
    assert ema.state_dict()["partitioning"] is None
    assert ema.shadow.nbytes >= sum(p.nbytes for p in model.parameters())


def test_on_one_rank_the_average_is_whole():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _model()
        ema = EMA(smoothing=0.5, shard_over_ranks=True)
        ema.update(model)
        assert not ema.state_is_per_rank and ema.state_dict()["partitioning"] is None
        assert set(ema.ema_state_dict()) == set(model.state_dict())
    finally:
        dist.destroy_process_group()


def test_flatten_model_with_shard_over_ranks_is_refused():
    with pytest.raises(ValueError, match="flatten_model=True and shard_over_ranks=True do not go together"):
        EMA(flatten_model=True, shard_over_ranks=True)
    with pytest.raises(ValueError, match="shard_over_ranks='yes' must be True or False"):
        EMA(shard_over_ranks="yes")


def test_a_per_rank_state_resumes_on_as_many_ranks_only():
    saved = distributed.gather_states({"weights": {}})
    assert distributed.own_state(saved) == {"weights": {}}  # one process: its own entry
    two = {"per_rank_states": [{"a": 0}, {"a": 1}]}
    with pytest.raises(ValueError, match=r"per-rank states of 2 rank\(s\), but this run has 1"):
        distributed.own_state(two)
    assert distributed.own_state({"weights": {}}) == {"weights": {}}  # not per rank: as it is


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_ddp_averages_its_slice_and_resumes_it_bit_for_bit(tmp_path):
    """``EMACallback(ema=EMA(shard_over_ranks=True))`` under Lightning's ``strategy="ddp"``: closed form, evaluation
    with the average, and a checkpoint (written by rank 0 with every rank's slice) resumed bit for bit on every rank:
    see ``shard_over_ranks_lightning_script.py``."""
    result = torchrun(LIGHTNING_SCRIPT, str(tmp_path), timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hugging_face_ddp_averages_its_slice_evaluates_and_saves_the_whole(tmp_path):
    """``EMATrainer(ema=EMA(shard_over_ranks=True))`` under DDP on the CPU: see ``shard_over_ranks_hf_script.py``."""
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))  # the emakit under test
    result = torchrun(HF_SCRIPT, str(tmp_path), timeout=170, PYTHONPATH=path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_bench_has_a_2_rank_row_of_update_time_and_bytes_against_the_whole_ema():
    """``emakit bench``'s 2-rank section (quick): the split EMA timed against the whole one in the same run; each
    rank's slice holds about half the whole one's bytes. Speed itself is not asserted (the machine is shared)."""
    import argparse

    from emakit.bench.ranks import bench_ranks
    from emakit.bench.report import summary_tables

    args = argparse.Namespace(device=torch.device("cpu"), repeats=3, warmup=1, threads=1, quick=True)
    row = bench_ranks("convnet", args)
    assert row["ranks"] == 2 and len(row["per_rank"]) == 2
    assert row["shard_over_ranks_bytes_ratio"] <= 0.51, row
    assert row["shard_over_ranks_update_s"] > 0 and row["whole_update_s"] > 0
    assert row["shard_over_ranks_update_ratio"] > 0
    assert "EMA(shard_over_ranks=True) and an EMA of FSDP2 shards" in summary_tables({"layouts": {}, "ranks": row})


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_deepspeed_zero2_engine_averages_its_slice_and_zero3_is_refused(deepspeed_cpu):
    """ZeRO-2 (bf16, whole parameters) split over the ranks: see ``shard_over_ranks_zero_script.py``."""
    result = torchrun(ZERO_SCRIPT, "2", "bf16", timeout=170, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_ranks_slices_cover_the_flat_layout_once_in_memory_order(world):
    """Every element of every tensor is in exactly one rank's pieces, in memory order (channels-last too), and every
    rank's slice is at most ceil(total / world) elements."""
    from emakit.storage.ranks import RankSlices, flat

    torch.manual_seed(0)
    tensors = [
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        torch.randn(7),
        torch.randn(0),
        torch.randn(3, 11),
    ]
    names = [f"t{i}" for i in range(len(tensors))]
    memory_order = torch.cat([tensors[0].permute(0, 2, 3, 1).reshape(-1), *(t.reshape(-1) for t in tensors[1:])])
    slices = [RankSlices(names, tensors, rank, world) for rank in range(world)]
    pieces = [flat(tensors[k])[a:b] for s in slices for k, a, b in s.pieces]
    assert torch.equal(torch.cat(pieces), memory_order)
    size = -(-memory_order.numel() // world)
    assert all(s.size == size and sum(b - a for _, a, b in s.pieces) <= size for s in slices)
    for k in range(len(tensors)):  # who holds what of each tensor, as every rank computes it
        held = [(r, a, b) for r, s in enumerate(slices) for kk, a, b in s.pieces if kk == k]
        assert slices[0].owners(k) == held, (k, held)


def test_a_strided_view_with_gaps_is_refused_naming_it():
    from emakit.storage.ranks import RankSlices

    with pytest.raises(ValueError, match="'w' is not dense"):
        RankSlices(["w"], [torch.randn(4, 6)[:, ::2]], rank=0, world=2)
