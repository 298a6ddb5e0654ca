"""SIGKILL a training run at chosen points, resume it with autoresume, and get the uninterrupted run bit for bit.

The run is tests/fault_train.py: 3 epochs of 10 shuffled batches, Dropout and BatchNorm, SGD with
momentum and a step schedule, an EMA, an eval every 4 batches and a checkpoint every 3 (after
batches 3, 6, ..., 30). The uninterrupted reference runs in a fresh interpreter; the interrupted
runs are forked from one server process (``fault_train.py --serve``) so that each costs a fraction
of a second instead of an interpreter start. A run pauses at the line it was asked to, the test
kills it there with SIGKILL, checks the checkpoint folder, and starts the next run on the same
folder, which must resume from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from emakit.trainer.checkpoint import list_checkpoints, load_checkpoint

SCRIPT = Path(__file__).with_name("fault_train.py")
TIMEOUT = 120  # seconds for any one step; a normal run takes about one
CHECKPOINT_NAME = re.compile(r"^ep\d+-ba\d+\.pt$")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Server:
    """``fault_train.py --serve``: forks one training run per request; the test reads their lines."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.child: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no output from the training run for {TIMEOUT} s")
        if line is None:
            pytest.fail(f"the server died (exit code {self.process.wait(timeout=TIMEOUT)}); see stderr")
        return line

    def run(self, folder: Path, result: Path, kill_at: str | None = None, pause: bool = True) -> list[str]:
        """One run on ``folder``, SIGKILLed at the line ``kill_at`` (None: to the end); returns its lines.

        With ``pause`` the run sleeps at that line until killed; without, it runs on while the kill is sent
        (slowed down by 30 ms a batch, so that the kill comes before the run ends even on a busy machine).
        """
        request = {"save_folder": str(folder), "result_file": str(result)}
        request.update({"pause": kill_at} if pause else {"throttle": 0.03})
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        first = self.next_line()
        assert first.startswith("pid "), first
        self.child = int(first.split()[1])
        lines: list[str] = []
        while not (line := self.next_line()).startswith("exited "):
            lines.append(line)
            if line == kill_at:
                with contextlib.suppress(ProcessLookupError):  # ended already: reported below
                    os.kill(self.child, signal.SIGKILL)
        self.child = None
        status = int(line.split()[1])
        if kill_at is None:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the run failed: {lines[-5:]}"
        else:
            assert kill_at in lines, f"the run ended without reaching {kill_at!r}: {lines[-5:]}"
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        return lines

    def close(self) -> None:
        if self.child is not None:  # a run still sleeping after a failed test
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        self.process.stdin.close()
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, server) -> dict:
    """The results of the run never killed, in its own fresh interpreter (while the server starts up)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder / "checkpoints"), str(folder / "result.pt")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=ENV,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0] == "fit_start 0" and lines[-1] == "done"
    assert [line for line in lines if line.startswith("epoch_end")] == ["epoch_end 1", "epoch_end 2", "epoch_end 3"]
    return torch.load(folder / "result.pt", weights_only=True)


def resumed_from(lines: list[str]) -> int:
    """The batch a run started at, from its ``fit_start B`` line."""
    assert lines and lines[0].startswith("fit_start "), lines[:3]
    return int(lines[0].split()[1])


def assert_only_complete_checkpoints(folder: Path, allow_partial: bool = False) -> None:
    """Every file under a checkpoint's name loads; nothing else is there but (maybe) hidden temporary files."""
    for path in folder.iterdir():
        if CHECKPOINT_NAME.match(path.name):
            checkpoint = load_checkpoint(path)  # raises on a half-written file
            assert {"model", "algorithms", "timestamp", "rng"} <= checkpoint.keys(), path.name
        else:
            assert allow_partial and path.name.startswith(".") and ".partial" in path.name, path.name
    assert list_checkpoints(folder), "no checkpoint was written"


def assert_same_results(actual: dict, expected: dict) -> None:
    for part in ("model", "ema"):
        assert actual[part].keys() == expected[part].keys(), part
        for name, tensor in expected[part].items():
            assert actual[part][name].dtype == tensor.dtype, f"{part} {name}"
            assert torch.equal(actual[part][name], tensor), f"{part} {name} differs from the uninterrupted run"
    assert actual["ema_counters"] == expected["ema_counters"]
    assert actual["timestamp"] == expected["timestamp"]
    assert actual["eval_history"] == expected["eval_history"]  # every eval of the run, metrics compared exactly
    assert actual["eval"] == expected["eval"]


@pytest.mark.parametrize(
    ("kills", "resume_batches"),
    [
        pytest.param(["batch_end 1"], [0], id="before-any-checkpoint-starts-fresh"),
        pytest.param(["batch_end 5"], [3], id="mid-epoch"),
        pytest.param(["batch_start 9"], [9], id="right-after-a-checkpoint"),
        pytest.param(["batch_start 12"], [12], id="right-after-a-checkpoint-taken-after-an-eval"),
        pytest.param(["epoch_end 2"], [18], id="during-an-epoch-end"),
        pytest.param(["epoch_end 3"], [30], id="during-the-last-epoch-end-after-the-last-checkpoint"),
        pytest.param(
            ["batch_end 5", "batch_start 13", "epoch_end 2", "batch_end 26"], [3, 12, 18, 24], id="killed-four-times"
        ),
    ],
)
def test_a_run_killed_and_resumed_with_autoresume_matches_the_uninterrupted_run_bit_for_bit(
    tmp_path, server, uninterrupted, kills, resume_batches
):
    folder, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    starts = []
    for kill_at in kills:
        starts.append(resumed_from(server.run(folder, result, kill_at=kill_at)))
        assert not result.exists()
        if kill_at != "batch_end 1":
            assert_only_complete_checkpoints(folder)
    lines = server.run(folder, result)
    starts.append(resumed_from(lines))
    assert starts == [0, *resume_batches], "the runs did not resume from the newest checkpoint"
    assert lines[-1] == "done"
    assert_same_results(torch.load(result, weights_only=True), uninterrupted)
    assert_only_complete_checkpoints(folder)


def test_a_run_killed_while_running_on_resumes_from_a_complete_checkpoint_and_matches(tmp_path, server, uninterrupted):
    """The kill is sent without pausing the run: it lands wherever the run has got to, maybe inside a save."""
    folder, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    server.run(folder, result, kill_at="batch_end 16", pause=False)
    assert_only_complete_checkpoints(folder, allow_partial=True)
    lines = server.run(folder, result)
    assert resumed_from(lines) >= 15
    assert_same_results(torch.load(result, weights_only=True), uninterrupted)
    assert_only_complete_checkpoints(folder, allow_partial=True)
