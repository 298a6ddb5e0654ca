"""EMACallback under Lightning's sharding strategies, with the real Lightning on 2 CPU processes (gloo).

- ``ModelParallelStrategy`` (FSDP2 through ``fully_shard`` in ``configure_model``): ``lightning_sharded_script.py``
  checks, against the float64 closed form of the gathered weights and against runs without the callback or without
  interruption, the average, evaluation, training, resume (Lightning's checkpoint folder and its one-file variant),
  the export, the bytes per rank and the absence of collectives in an update;
- ``examples/lightning_model_parallel.py`` (the runnable example of ``docs/integrations/lightning.md``) is run and
  resumed;
- ``DeepSpeedStrategy``: Lightning 2.6 refuses the CPU, so the callback under it is tested on GPUs
  (``tests/gpu/test_lightning_deepspeed.py``); here a test pins that the refusal is Lightning's own, and the
  mechanism its ZeRO-3 checkpoints rely on (the average saved whole by rank 0, each rank taking its partitions back
  on load) runs with a raw DeepSpeed engine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
from torchrun import torchrun

from emakit.integrations.lightning import EMACallback

SCRIPT = Path(__file__).with_name("lightning_sharded_script.py")
WHOLE_STATE_SCRIPT = Path(__file__).with_name("deepspeed_whole_state_script.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning_model_parallel.py"


def run_script(tmp_path: Path, case: str) -> None:
    result = torchrun(SCRIPT, str(tmp_path), case, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(f"{case} rank") == 2 and result.stdout.count(": ok") == 2, result.stdout[-3000:]


def test_model_parallel_fsdp2_average_eval_training_resume_export_and_bytes(tmp_path):
    """The model built in ``__init__``; Lightning's default checkpoint: a DCP folder holding every rank's shards."""
    run_script(tmp_path, "folder")


def test_model_parallel_module_ends_with_the_average(tmp_path):
    """``EMACallback(end_with="average")`` under FSDP2: each rank's shards of the module become the average's."""
    run_script(tmp_path, "end_with")


def test_model_parallel_one_file_checkpoint_and_an_average_carried_over_from_ddp(tmp_path):
    """The model built in ``configure_model``; ``save_distributed_checkpoint=False``; an average started under DDP."""
    run_script(tmp_path, "file")


def run_example(out: Path, *args: str) -> tuple[int, float, float, int]:
    """Run the example; returns (optimizer steps, validation loss with the EMA swapped in, the plain module's loss
    with the exported file, EMA updates)."""
    result = torchrun(EXAMPLE, *args, "--out", str(out), timeout=200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    swapped = re.search(r"step (\d+): validation with the EMA swapped in: loss ([\d.]+)", result.stdout)
    plain = re.search(r"plain module with the exported EMA weights: loss ([\d.]+)", result.stdout)
    updates = re.search(r"\((\d+) updates\)", result.stdout)
    assert swapped and plain and updates, result.stdout[-3000:]
    return int(swapped.group(1)), float(swapped.group(2)), float(plain.group(1)), int(updates.group(1))


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> tuple[Path, tuple[int, float, float, int]]:
    """The example for one epoch (512 samples, batch 32, 2 ranks: 8 optimizer steps)."""
    out = tmp_path_factory.mktemp("example")
    return out, run_example(out, "--epochs", "1")


def test_the_model_parallel_example_exports_what_validation_saw(example_run):
    """Validation with the average swapped in measures the loss the plain module holding the exported file does."""
    _, (steps, swapped, plain, updates) = example_run
    assert steps == updates == 8  # one update per optimizer step
    assert abs(swapped - plain) <= 2e-6, (swapped, plain)


def test_the_model_parallel_example_resumes_from_its_last_checkpoint(example_run, tmp_path):
    """Resumed from ``last.ckpt`` to two epochs, the run continues the count of updates and trains on. (Resuming
    bit for bit is checked by the tests above.)"""
    first, (_, _, before, _) = example_run
    shutil.copytree(first, tmp_path / "run")
    steps, swapped, plain, updates = run_example(tmp_path / "run", "--epochs", "2", "--resume")
    assert steps == updates == 16
    assert abs(swapped - plain) <= 2e-6, (swapped, plain)
    assert plain != before


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_lightning_refuses_deepspeed_on_the_cpu(tmp_path, monkeypatch):
    """Lightning 2.6's DeepSpeedStrategy runs on CUDA only (its accelerator check, then its device-index checks and
    the ``device_rank`` it hands DeepSpeed): the callback under it is tested on GPUs. When this test fails, Lightning
    has lifted the refusal: test the callback under it on the CPU too."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from lightning.pytorch.demos.boring_classes import BoringModel

    module = BoringModel()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=3), callbacks=[EMACallback(smoothing=0.9)],
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    refused = pytest.raises(RuntimeError, match="The DeepSpeed strategy is only supported on CUDA GPUs")
    with refused as refusal, mock.patch.dict(os.environ):  # Lightning sets MASTER_ADDR and friends before refusing
        trainer.fit(module)
    raised_in = Path(refusal.traceback[-1].path).as_posix()
    assert raised_in.endswith("lightning/pytorch/strategies/deepspeed.py"), raised_in


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_zero3_average_saved_whole_on_rank_0_resumes_every_ranks_partitions(tmp_path, deepspeed_cpu):
    """What the callback saves in Lightning's DeepSpeed checkpoint (callback states come from rank 0 only)."""
    result = torchrun(WHOLE_STATE_SCRIPT, str(tmp_path), timeout=150, **deepspeed_cpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == 2, result.stdout[-3000:]
