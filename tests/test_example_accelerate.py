"""examples/accelerate_loop.py with the real Accelerate on CPU, against independent references.

The script runs in fresh processes (Accelerate's state is a per-process singleton). The average is checked
against the float64 closed form of the weights the script records after every optimizer step, and a
saved-and-resumed run against the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from closed_form import ClosedForm
from torchrun import torchrun

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"
SMOOTHING = 2 ** (-1 / 10)  # the script's half_life="10ba", one update per optimizer step
ATOL, RTOL = 1e-6, 1e-5
# 1500 training samples in batches of 32: 47 micro-batches an epoch, the last one short. With --accumulate 2
# the epoch ends on an optimizer step of one micro-batch (Accelerate syncs at the end of the dataloader), and
# 30 steps reach into the second epoch; step 26 is 4 micro-batches into it.
STEPS, SAVE_AT = 30, 26


def run_script(out: Path, *args: str) -> dict:
    """Run the example in a fresh process; return its rank-0 result."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "test accuracy after" in done.stdout
    return load_result(out, 0)


def load_result(out: Path, rank: int) -> dict:
    return torch.load(out / f"result-rank{rank}.pt", weights_only=True)


def closed_form(recorded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    reference = ClosedForm(SMOOTHING)
    for weights in recorded:
        reference.update({k: v.double() for k, v in weights.items()})
    return reference.ema


def assert_matches_closed_form(result: dict, steps: int) -> None:
    recorded = result["recorded"]
    assert len(recorded) == steps
    for before, after in itertools.pairwise(recorded):  # each record follows a real optimizer step
        assert any(not torch.equal(before[k], after[k]) for k in before)
    for name, value in result["weights"].items():  # the last record is the final training weights
        assert torch.equal(recorded[-1][name], value), name
    ema = result["ema"]
    assert ema["num_updates"] == steps, "one update per optimizer step"
    assert ema["smoothing"] == pytest.approx(SMOOTHING, rel=1e-12)
    expected = closed_form(recorded)
    assert ema["weights"].keys() == expected.keys() == result["weights"].keys()
    for name, value in expected.items():
        torch.testing.assert_close(ema["weights"][name].double(), value, atol=ATOL, rtol=RTOL, msg=name)


def assert_same_state(actual: dict, expected: dict, where: str = "") -> None:
    """Equal, bit for bit, through nested dicts and lists."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    else:
        assert actual == expected, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The reference run: STEPS optimizer steps of 2 micro-batches each, weights recorded."""
    return run_script(tmp_path_factory.mktemp("uninterrupted"), "--steps", str(STEPS), "--accumulate", "2", "--record")


def test_ema_is_the_closed_form_of_the_weights_after_each_step(tmp_path):
    result = run_script(tmp_path, "--steps", "12", "--record")
    assert_matches_closed_form(result, 12)
    exported = safetensors.torch.load_file(tmp_path / "ema.safetensors")  # keyed like the plain model
    assert_same_state(exported, result["ema"]["weights"])


def test_with_gradient_accumulation_the_ema_updates_once_per_optimizer_step(uninterrupted):
    assert_matches_closed_form(uninterrupted, STEPS)
    assert uninterrupted["accuracy"]["ema"] > 0.5  # it learned something: the digits are 10 classes


def test_save_state_and_resume_continue_exactly(tmp_path, uninterrupted):
    saving = run_script(tmp_path, "--steps", str(STEPS), "--accumulate", "2", "--save-at", str(SAVE_AT))
    assert_same_state(saving["weights"], uninterrupted["weights"], "saving run weights")  # saving changes nothing
    assert_same_state(saving["ema"], uninterrupted["ema"], "saving run ema")
    state = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert "custom_checkpoint_0.pkl" in state and "custom_checkpoint_1.pkl" in state  # the EMA and the progress
    (tmp_path / "result-rank0.pt").unlink()

    resumed = run_script(tmp_path, "--steps", str(STEPS), "--accumulate", "2", "--resume")
    assert resumed["ema"]["num_updates"] == STEPS
    assert_same_state(resumed["weights"], uninterrupted["weights"], "weights")
    assert_same_state(resumed["ema"], uninterrupted["ema"], "ema")
    assert resumed["accuracy"] == uninterrupted["accuracy"]


def test_two_processes_keep_identical_weights_and_averages(tmp_path):
    args = ("--out", str(tmp_path), "--steps", "12", "--accumulate", "2", "--record", "--save-at", "6")
    done = torchrun(SCRIPT, *args, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [load_result(tmp_path, rank) for rank in (0, 1)]
    assert_same_state(results[1]["weights"], results[0]["weights"], "weights")
    assert_same_state(results[1]["ema"], results[0]["ema"], "ema")
    for result in results:
        assert_matches_closed_form(result, 12)
    assert_same_state(safetensors.torch.load_file(tmp_path / "ema.safetensors"), results[0]["ema"]["weights"])
    state = sorted(p.name for p in (tmp_path / "state").iterdir())
    # one copy of the custom objects (the main process's), RNG states per process
    assert state == [
        "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "model.safetensors", "optimizer.bin",
        "random_states_0.pkl", "random_states_1.pkl",
    ]  # fmt: skip
