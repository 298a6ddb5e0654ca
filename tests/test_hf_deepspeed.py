"""``EMATrainer`` with the Hugging Face Trainer's ``deepspeed=`` (ZeRO-2, ZeRO-3) on 2 CPU processes, and where each
rank's EMA state goes in a checkpoint folder (:mod:`emakit.integrations.state_files`).

``hf_deepspeed_script.py`` trains, checks and resumes under torchrun (see its docstring); this file then loads the
exported folder with ``from_pretrained`` in a process without DeepSpeed and compares it and the evaluation metrics
with plain models. Skipped where DeepSpeed or transformers is not installed. DeepSpeed runs on the CPU in the
environment of the ``deepspeed_cpu`` fixture (``conftest.py``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torchrun import torchrun

pytest.importorskip("transformers")
from test_integration_transformers import make_args, make_data, make_model
from transformers import GPT2LMHeadModel, Trainer

from emakit import EMA
from emakit.integrations import state_files
from emakit.integrations.transformers import EMA_STATE_NAME, EMATrainerCallback

SCRIPT = Path(__file__).with_name("hf_deepspeed_script.py")
deepspeed_installed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def plain_loss(state: dict[str, torch.Tensor], tmp_path: Path) -> float:
    """The eval loss a plain ``Trainer`` (one process, no DeepSpeed) measures on a GPT-2 holding ``state``."""
    model = make_model()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # lm_head.weight: tied to wte
    args = make_args(tmp_path / "plain-eval", per_device_eval_batch_size=8)  # the script's 2 ranks: a batch each
    return Trainer(model=model, args=args).evaluate(make_data(16, seed=2))["eval_loss"]


@deepspeed_installed
@pytest.mark.parametrize(
    ("stage", "persistence"), [(3, 0), (3, 100), (2, 0)], ids=["zero3", "zero3-persistent-small-tensors", "zero2"]
)
def test_ema_trainer_under_deepspeed_averages_evaluates_resumes_and_exports(
    tmp_path, deepspeed_cpu, stage, persistence
):
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))  # the emakit under test
    arguments = [str(stage), str(persistence), str(tmp_path)]
    result = torchrun(SCRIPT, *arguments, timeout=240, PYTHONPATH=path, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
    if stage == 3:
        assert result.stdout.count("ZeRO-3 average holds 0.5") == 2, result.stdout[-3000:]
    reference = torch.load(tmp_path / "result.pt", weights_only=True)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "ema").state_dict()
    assert loaded.keys() == reference["expected"].keys()
    for name, value in reference["expected"].items():
        torch.testing.assert_close(loaded[name].double(), value, rtol=1e-5, atol=2e-6, msg=name)
    metrics = reference["metrics"]
    assert metrics["eval_loss"] == pytest.approx(plain_loss(loaded, tmp_path), rel=1e-5)
    assert metrics["eval_training_loss"] == pytest.approx(plain_loss(reference["final"], tmp_path), rel=1e-5)
    assert abs(metrics["eval_loss"] - metrics["eval_training_loss"]) > 1e-4  # the two are told apart


def started_ema() -> EMA:
    ema = EMA(smoothing=0.5)
    ema.update(make_model())
    return ema


def test_a_whole_average_is_written_once_by_the_main_process(tmp_path):
    ema = started_ema()
    assert not state_files.per_rank(ema)
    assert state_files.save_state(ema, tmp_path, rank=1, main=False) is None
    assert state_files.save_state(ema, tmp_path, rank=0, main=True) == tmp_path / EMA_STATE_NAME
    assert sorted(os.listdir(tmp_path)) == [EMA_STATE_NAME]


def test_checkpoints_of_whole_averages_still_resume_on_every_rank(tmp_path):
    """A checkpoint written before per-rank files (one ``emakit_ema.pt``) loads on every rank, bit for bit."""
    ema = started_ema()
    torch.save(ema.state_dict(), tmp_path / EMA_STATE_NAME)  # the format EMATrainerCallback always wrote
    for rank in (0, 1):
        callback = EMATrainerCallback(EMA(smoothing=0.5))
        callback.load_state(tmp_path, rank=rank)
        for name, value in ema.state_dict()["weights"].items():
            assert torch.equal(callback.ema.state_dict()["weights"][name], value), name


def test_a_ranks_own_file_is_read_before_the_whole_one(tmp_path):
    first, second = started_ema(), started_ema()
    second.update(make_model())  # another num_updates
    torch.save(first.state_dict(), tmp_path / EMA_STATE_NAME)
    torch.save(second.state_dict(), tmp_path / state_files.rank_state_name(1))
    for rank, expected in ((0, first), (1, second)):
        ema = EMA(smoothing=0.5)
        assert state_files.load_state(ema, tmp_path, rank).name == (
            EMA_STATE_NAME if rank == 0 else "emakit_ema-rank1.pt"
        )
        assert ema.num_updates == expected.num_updates


def test_per_rank_states_of_a_smaller_world_are_refused_naming_the_ranks(tmp_path):
    for rank in (0, 1):
        torch.save(started_ema().state_dict(), tmp_path / state_files.rank_state_name(rank))
    with pytest.raises(FileNotFoundError, match=r"ranks \[0, 1\] .* none for rank 2: resume on the world size"):
        state_files.load_state(EMA(smoothing=0.5), tmp_path, rank=2)
    assert state_files.has_state(tmp_path, 1) and not state_files.has_state(tmp_path, 2)


def test_a_folder_without_an_ema_state_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no emakit_ema\.pt"):
        state_files.load_state(EMA(), tmp_path, rank=0)
    with pytest.raises(ValueError, match="rank=-1 must be an int >= 0"):
        state_files.rank_state_name(-1)


@deepspeed_installed
def test_the_documented_example_exports_what_it_evaluated(tmp_path, deepspeed_cpu):
    """``examples/transformers_deepspeed.py`` (ZeRO-3, 20 steps): each process's state is in ``checkpoint-10/``, and
    the exported folder, loaded with ``from_pretrained`` here (no DeepSpeed), evaluates to the ``eval_loss`` the
    example measured with the average swapped in."""
    example = SCRIPT.parents[1] / "examples" / "transformers_deepspeed.py"
    result = torchrun(example, "--cpu", "--out", str(tmp_path), timeout=180, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 20: eval_loss (EMA) "))
    measured = float(line.split("eval_loss (EMA) ")[1].split(",")[0])
    names = sorted(f.name for f in (tmp_path / "checkpoint-10").glob("emakit_ema*"))
    assert names == ["emakit_ema-rank0.pt", "emakit_ema-rank1.pt"], names
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "ema")
    args = make_args(tmp_path / "plain-eval", per_device_eval_batch_size=8)
    data = make_data(16, seed=2)  # the example's eval data
    assert Trainer(model=model, args=args).evaluate(data)["eval_loss"] == pytest.approx(measured, abs=1e-6)


def test_fsdp2_shards_are_saved_by_every_rank_and_resume(tmp_path, monkeypatch):
    """An FSDP2 average (DTensor local shards, here on a 1-process gloo group) is a per-rank state: rank 0's file,
    loaded back bit for bit. (Saved once by the main process, every rank would load rank 0's shards.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchrun import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # this test's only: a later Trainer would think it is distributed
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        fully_shard(model)
        ema = EMA(smoothing=0.5)
        ema.update(model)
        assert type(next(model.parameters())).__name__ == "DTensor" and state_files.per_rank(ema)
        assert state_files.save_state(ema, tmp_path, rank=0, main=True) == tmp_path / "emakit_ema-rank0.pt"
        resumed = EMA(smoothing=0.5)
        state_files.load_state(resumed, tmp_path, rank=0)
        resumed.update(model)
        ema.update(model)
        for name, value in ema.ema_state_dict().items():
            assert torch.equal(resumed.ema_state_dict()[name], value), name
    finally:
        dist.destroy_process_group()
