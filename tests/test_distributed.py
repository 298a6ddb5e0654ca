"""Multi-process training on CPU: 2 processes launched by torchrun, gloo, the run of tests/distributed_train.py.

A 2-rank run with per-rank batch b equals the single-process run with batch 2b (training weights, EMA weights,
eval metrics) for DDP and FSDP2; a rank that fails or hangs makes the job exit non-zero instead of hanging.
The rest checks the helpers of emakit.distributed in this process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchrun import torchrun

from emakit import EMA, Classifier, Trainer, distributed
from emakit.export import ema_states_at, save_ema_state
from emakit.trainer.checkpoint import list_checkpoints, load_checkpoint

SCRIPT = Path(__file__).with_name("distributed_train.py")
spec = importlib.util.spec_from_file_location("distributed_train", SCRIPT)
distributed_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distributed_train)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
_FSDP_ON_CPU = distributed.TORCH_VERSION >= distributed.FSDP_ON_CPU_SINCE
needs_fsdp_on_cpu = pytest.mark.skipif(
    not _FSDP_ON_CPU, reason="FSDP2 on CPU is refused before torch 2.9 (tested below)"
)


def _torchrun(mode: str, out: Path, timeout: float = 90, **env: str) -> subprocess.CompletedProcess:
    return torchrun(SCRIPT, mode, str(out), timeout=timeout, **env)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict]:
    """The single-process runs with batch 2b, by run name."""
    out = tmp_path_factory.mktemp("single")
    distributed_train.main(None, str(out), batch_size=2 * distributed_train.PER_RANK_BATCH)
    return {name: torch.load(out / f"{name}-single-rank0.pt", weights_only=False) for name in distributed_train.RUNS}


def _launch(mode: str, out: Path) -> None:
    result = _torchrun(mode, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _load(out: Path, name: str, mode: str) -> list[dict]:
    return [torch.load(out / f"{name}-{mode}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


def _assert_equivalent(ranks: list[dict], reference: dict, what: str) -> None:
    for rank, result in enumerate(ranks):
        _assert_close(result["model"], reference["model"], f"{what} training weights, rank {rank}")
        _assert_close(result["ema"], reference["ema"], f"{what} EMA weights, rank {rank}")
        assert result["eval"].keys() == reference["eval"].keys()
        assert result["eval"]["accuracy"] == reference["eval"]["accuracy"], what
        assert result["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-6), what
        assert result["timestamp"] == reference["timestamp"], what
        assert result["same_model_object"], what
        assert result["ema_model_type"] == "Classifier", what  # under FSDP too: a plain module, unsharded
        for name, tensor in result["ema"].items():
            assert torch.equal(result["ema_model"][name], tensor), f"{what}: ema_model differs at {name}"
    for name, tensor in ranks[0]["ema"].items():
        assert torch.equal(tensor, ranks[1]["ema"][name]), f"{what}: the ranks' EMAs differ at {name}"
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{what}: the ranks' weights differ at {name}"


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, single):
    _launch("ddp", tmp_path)
    for name in distributed_train.RUNS:
        _assert_equivalent(_load(tmp_path, name, "ddp"), single[name], f"DDP {name}")
    # rank 0 wrote the checkpoint, named as the plain model (no DDP "module." prefix); resuming ends as uninterrupted
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")[:1]
    assert set(load_checkpoint(checkpoint)["model"]) == set(single["sequential"]["model"])
    resumed, uninterrupted = _load(tmp_path, "resumed", "ddp"), _load(tmp_path, "sequential", "ddp")
    for key in ("model", "ema"):
        for name, tensor in uninterrupted[0][key].items():
            assert torch.equal(resumed[0][key][name], tensor), f"resumed {key} {name}"
    assert resumed[0]["eval"] == uninterrupted[0]["eval"]


@needs_fsdp_on_cpu
def test_fsdp_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, single):
    _launch("fsdp", tmp_path)
    for name in distributed_train.RUNS:
        ranks = _load(tmp_path, name, "fsdp")
        _assert_equivalent(ranks, single[name], f"FSDP {name}")
        # each rank's EMA holds its shards only: together the full EMA, each about half of it
        full = single[name]["ema_local_bytes"]
        assert sum(result["ema_local_bytes"] for result in ranks) == full
        assert max(result["ema_local_bytes"] for result in ranks) <= 0.55 * full
    # the DCP checkpoint is a folder; resuming from it ends bit for bit as the uninterrupted run
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")[:1]
    assert checkpoint.is_dir() and checkpoint.suffix == ".dcp"
    resumed, uninterrupted = _load(tmp_path, "resumed", "fsdp"), _load(tmp_path, "sequential", "fsdp")
    for rank in (0, 1):
        for key in ("model", "ema"):
            for name, tensor in uninterrupted[rank][key].items():
                assert torch.equal(resumed[rank][key][name], tensor), f"resumed {key} {name} on rank {rank}"
        assert resumed[rank]["eval"] == uninterrupted[rank]["eval"]
        assert resumed[rank]["eval_history"] == uninterrupted[rank]["eval_history"]
    # emakit export reads the last DCP folder whole, in this one process: the run's gathered average, bit for bit
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.name.startswith("ep2-"), newest
    (state,) = ema_states_at(newest)
    exported = safetensors.torch.load_file(save_ema_state(state, tmp_path / "exported.safetensors"))
    assert sorted(exported) == sorted(resumed[0]["ema_model"])
    for name, tensor in resumed[0]["ema_model"].items():
        assert torch.equal(exported[name], tensor), f"exported {name}"


@needs_fsdp_on_cpu
def test_fsdp_run_killed_after_a_dcp_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    killed = _torchrun("fsdp-kill", tmp_path)
    assert killed.returncode != 0, "the run should have been killed"
    checkpoints = list_checkpoints(tmp_path / "killed")
    assert [path.name for path in checkpoints] == ["ep0-ba5.dcp"], checkpoints
    assert not list((tmp_path / "killed").glob(".*partial*"))
    _launch("fsdp-resume", tmp_path)
    _launch("fsdp", tmp_path / "reference")
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"killed-resumed-fsdp-rank{rank}.pt", weights_only=False)
        reference = torch.load(tmp_path / "reference" / f"sequential-fsdp-rank{rank}.pt", weights_only=False)
        for key in ("model", "ema"):
            for name, tensor in reference[key].items():
                assert torch.equal(resumed[key][name], tensor), f"{key} {name} on rank {rank}"
        assert resumed["eval"] == reference["eval"]


@pytest.mark.skipif(_FSDP_ON_CPU, reason="this torch runs FSDP2 on CPU correctly")
def test_fsdp_on_cpu_is_refused_where_torch_gets_it_wrong(tmp_path):
    result = _torchrun("fsdp", tmp_path)
    assert result.returncode != 0
    assert "FSDP2 on the CPU (gloo) needs torch >= 2.9" in result.stdout + result.stderr


# The subprocess timeouts below only keep a broken run from blocking the suite (a loaded machine may be slow); what
# shows the behaviour is the error the job ends with.
def test_a_failing_rank_ends_the_job(tmp_path):
    result = _torchrun("fail", tmp_path, timeout=600, EMAKIT_DIST_TIMEOUT="20")
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr


def test_a_hanging_rank_times_out_with_a_clear_error(tmp_path):
    result = _torchrun("hang", tmp_path, timeout=600, EMAKIT_DIST_TIMEOUT="3")
    assert result.returncode != 0  # the other rank gave up after 3 s: the hanging one sleeps 120 s
    output = result.stdout + result.stderr
    assert "CollectiveError" in output and "EMAKIT_DIST_TIMEOUT" in output, output[-4000:]


# ------------------------------------------------------------------ in this process
def _tiny_trainer(model: nn.Module, **kwargs) -> Trainer:
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    return Trainer(
        model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="1ba", progress_bar=False, **kwargs
    )


@pytest.mark.parametrize("parallelism", [None, "ddp", "fsdp"])
def test_parallelism_in_one_process_is_a_no_op(parallelism, tmp_path):
    model = Classifier(nn.Linear(3, 2))
    trainer = _tiny_trainer(
        model, parallelism=parallelism, algorithms=[EMA(half_life="1ba")], save_folder=tmp_path, save_interval="1ba"
    )
    trainer.fit()
    assert trainer.state.model is model and type(model) is Classifier
    assert list_checkpoints(tmp_path)


def test_unknown_parallelism_is_refused():
    with pytest.raises(ValueError, match=r"parallelism='zero3'.*'ddp', 'fsdp'"):
        _tiny_trainer(Classifier(nn.Linear(3, 2)), parallelism="zero3")


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_user_made_ddp_model_with_parallelism_is_refused(one_rank_group):
    model = nn.parallel.DistributedDataParallel(Classifier(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"already wrapped for DDP.*parallelism='ddp'.*parallelism=None"):
        _tiny_trainer(model, parallelism="ddp")


def test_a_user_made_ddp_model_trains_and_saves_plain_names(one_rank_group, tmp_path):
    model = nn.parallel.DistributedDataParallel(Classifier(nn.Linear(3, 2)))
    trainer = _tiny_trainer(model, save_folder=tmp_path, save_interval="1ba", algorithms=[EMA(half_life="1ba")])
    trainer.fit()
    assert trainer.state.model is model
    # the Classifier's own names ("module" is its attribute), not DDP's "module.module.weight"
    assert set(load_checkpoint(list_checkpoints(tmp_path)[-1])["model"]) == {"module.weight", "module.bias"}


def test_eval_shards_cover_every_sample_once():
    for world in (2, 3, 5):
        shards = [list(distributed.EvalShardSampler(21, rank, world)) for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(21))
        assert [len(distributed.EvalShardSampler(21, rank, world)) for rank in range(world)] == list(map(len, shards))


def test_loaders_are_rebuilt_with_their_settings(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def collate(batch):
        return torch.stack([x for x, _ in batch])

    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10))
    train = distributed.shard_train_loader(
        DataLoader(data, batch_size=2, shuffle=True, collate_fn=collate, drop_last=True), seed=7
    )
    assert isinstance(train.sampler, DistributedSampler) and train.sampler.shuffle and train.sampler.seed == 7
    assert (train.batch_size, train.drop_last, train.collate_fn) == (2, True, collate)
    assert train.sampler.rank == 1 and train.sampler.num_replicas == 2
    evaluation = distributed.shard_eval_loader(DataLoader(data, batch_size=3))
    assert [b[0].squeeze(1).tolist() for b in evaluation] == [[1.0, 3.0, 5.0], [7.0, 9.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distributed.shard_eval_loader(evaluation) is evaluation  # already split: kept, no warning
    with pytest.warns(UserWarning, match="9 samples do not divide among 2 ranks: .* repeats 1 of them"):
        distributed.shard_train_loader(DataLoader(TensorDataset(torch.zeros(9)), batch_size=2), seed=0)
    custom = DataLoader(data, sampler=[0, 1, 2])
    with pytest.warns(UserWarning, match="does not shard it"):
        assert distributed.shard_train_loader(custom, seed=0) is custom


def test_bad_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("EMAKIT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"EMAKIT_DIST_TIMEOUT='soon'"):
        distributed.timeout_seconds()
