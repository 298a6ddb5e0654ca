"""``emakit bench`` runs end to end and reports consistent numbers. Speed itself is never asserted here."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from emakit import bench
from emakit.bench import targets
from emakit.bench.layouts import ResNet18, convnet_sizes, many_small_sizes
from emakit.bench.measure import EVAL_WINDOW, MODES, peak_in_window
from emakit.bench.peers import Impl, check_closed_form, is_peer


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        # One thread: on a busy machine parallel kernels stall waiting for a descheduled thread.
        assert bench.main(["--quick", "--threads", "1", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text())


def test_quick_bench_times_every_importable_implementation(results: dict) -> None:
    importable = {name for name, _, module, _ in bench.IMPLEMENTATIONS if bench.import_error(module) is None}
    assert {"emakit.EMA", "emakit.EMA(flatten_model)", "emakit.compute_ema", "per_tensor"} <= importable
    assert set(results["layouts"]) == set(bench.LAYOUTS)
    for layout in results["layouts"].values():
        assert set(layout["implementations"]) == importable
        assert set(layout["skipped"]) == {name for name, *_ in bench.IMPLEMENTATIONS} - importable
        assert all(reason for reason in layout["skipped"].values())
        assert all(row["time_s"] > 0 for row in layout["implementations"].values())


def test_quick_bench_ratios_are_roofline_and_peer_times_over_own_time(results: dict) -> None:
    for layout in results["layouts"].values():
        rows = layout["implementations"]
        assert layout["roofline"]["lerp_s"] > 0
        for name, row in rows.items():
            assert row["roofline_s"] > 0
            assert row["roofline_ratio"] == pytest.approx(row["roofline_s"] / row["time_s"])
            assert set(row["speedup_vs"]) == set(rows) - {name}
            for other, speedup in row["speedup_vs"].items():
                assert speedup == pytest.approx(rows[other]["time_s"] / row["time_s"])
            if not is_peer(name):
                fastest = min((n for n in rows if is_peer(n)), key=lambda n: rows[n]["time_s"])
                assert row["fastest_peer"] == fastest
                assert row["vs_fastest_peer"] == pytest.approx(rows[fastest]["time_s"] / row["time_s"])


def test_quick_bench_judges_the_update_targets_on_their_rows_only(results: dict) -> None:
    for layout_name, layout in results["layouts"].items():
        for name, row in layout["implementations"].items():
            if (layout_name, name) not in targets.UPDATE:
                assert "targets" not in row
                continue
            key, target = targets.UPDATE[layout_name, name]
            assert row["targets"] == {str(target): target.passes(row[key])}
    assert {layout for layout, _ in targets.UPDATE} <= set(results["layouts"])


def test_target_passes_on_its_side_of_the_limit() -> None:
    at_most, at_least = targets.Target("a", "<=", 2), targets.Target("b", ">=", 2)
    assert [at_most.passes(2), at_most.passes(2.1)] == [True, False]
    assert [at_least.passes(2), at_least.passes(1.9)] == [True, False]
    assert at_most.passes(None) is None and str(at_least) == "b >= 2"


def test_quick_bench_times_swaps_of_both_modes_against_a_copy_and_torch_ema(results: dict) -> None:
    has_torch_ema = bench.import_error("torch_ema") is None
    for layout in results["layouts"].values():
        swap = layout["swap"]
        assert swap["copy_s"] > 0 and swap["default_s"] > 0 and swap["flatten_model_s"] > 0
        assert swap["flatten_model_vs_copy"] == pytest.approx(swap["flatten_model_s"] / swap["copy_s"])
        assert swap["default_vs_copy"] == pytest.approx(swap["default_s"] / swap["copy_s"])
        if has_torch_ema:
            assert swap["default_vs_torch_ema"] == pytest.approx(swap["default_s"] / swap["torch_ema_s"])
        else:
            assert swap["torch_ema_s"] is None and swap["default_vs_torch_ema"] is None
        assert swap["targets"] == {
            str(targets.SWAP_FLATTEN): targets.SWAP_FLATTEN.passes(swap["flatten_model_vs_copy"]),
            str(targets.SWAP_DEFAULT): targets.SWAP_DEFAULT.passes(swap["default_vs_torch_ema"]),
        }


def test_quick_bench_reports_eval_memory_of_both_modes(results: dict) -> None:
    for layout in results["layouts"].values():
        memory = layout["eval_memory"]
        assert memory["model_bytes"] > 0
        for mode in MODES:
            row = memory[mode]
            assert row["extra_bytes"] >= memory["model_bytes"]  # the EMA holds at least its average
            assert row["ratio"] == pytest.approx(row["extra_bytes"] / memory["model_bytes"])
            target = targets.EVAL_MEMORY[mode]
            assert row["targets"] == {str(target): target.passes(row["ratio"])}


def test_eval_memory_counts_a_temporary_freed_inside_the_window() -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        kept = torch.randn(1_000)
        with torch.profiler.record_function(EVAL_WINDOW):
            temporary = torch.randn(10_000)
            del temporary
        after = torch.randn(100_000)  # outside the window: not counted
    assert 44_000 <= peak_in_window(profiler, torch.device("cpu")) < 48_000
    del kept, after


def test_quick_bench_measures_attaching_in_fresh_processes(results: dict) -> None:
    attach = results["attach_memory"]
    assert attach["parameters"] == 8 * 500 * 501 and attach["model_bytes"] == 4 * attach["parameters"]
    for mode in MODES:
        row = attach[mode]
        assert row["build_ratio"] > 0.9  # the model's memory is resident, and counted once
        assert row["ratio"] > row["build_ratio"] + 0.9  # and the average's
        peaks = row["peak_bytes"]
        assert row["ratio"] == pytest.approx((peaks["attached"] - peaks["baseline"]) / attach["model_bytes"])
        assert row["targets"] == {str(targets.ATTACH_MEMORY): targets.ATTACH_MEMORY.passes(row["ratio"])}


def test_quick_bench_reports_trainer_overhead(results: dict) -> None:
    trainer = results["trainer"]
    assert trainer["with_ema_s"] > 0 and trainer["without_ema_s"] > 0 and trainer["ratio"] > 0
    assert 0 < trainer["ema_share"] < 1
    assert trainer["targets"] == {str(targets.EMA_SHARE): targets.EMA_SHARE.passes(trainer["ema_share"])}
    assert results["meta"]["quick"] is True and results["meta"]["threads"] == 1


def test_closed_form_check_rejects_an_implementation_that_does_not_average() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match=r"lazy: parameter 0 is .* off the closed form"):
        check_closed_form(
            Impl("lazy", model, step=lambda: None, averages=lambda: [p.detach().clone() for p in model.parameters()])
        )


def test_layouts_are_those_of_the_design() -> None:
    assert (len(convnet_sizes()), sum(convnet_sizes())) == (300, 39_368_704)
    assert (len(many_small_sizes()), sum(many_small_sizes())) == (2000, 2_416_448)
    with torch.device("meta"):
        resnet = ResNet18()
    assert sum(p.numel() for p in resnet.parameters()) == 11_689_512


def test_quick_bench_measures_posthoc_update_snapshots_and_synthesis(results: dict) -> None:
    posthoc = results["posthoc"]
    assert posthoc["snapshots"] == 8
    assert posthoc["update_ratio"] == posthoc["posthoc_update_s"] / posthoc["ema_update_s"] > 0
    # a snapshot holds the weights (fp32, as the model) and a few counters: about the model's bytes
    assert posthoc["model_bytes"] <= posthoc["snapshot_bytes"] < 1.2 * posthoc["model_bytes"] + 4096
    assert posthoc["synthesis_s"] > 0 and posthoc["snapshot_write_s"] > 0


def test_quick_bench_times_several_averages_against_one_and_against_separate_emas(results: dict) -> None:
    several = results["several"]
    assert several["averages"] == 3
    assert several["several_vs_one"] == several["several_s"] / several["one_s"] > 0
    assert several["separate_vs_one"] == several["separate_s"] / several["one_s"] > 0
    for kind in ("uniform", "window"):
        assert several[f"{kind}_vs_one"] == several[f"{kind}_s"] / several["one_s"] > 0
    assert set(several["targets"]) == {
        "3 averages / one <= 2.6",
        "uniform: / one exponential <= 1.1",
        "window: / one exponential <= 1.1",
    }


def test_the_device_report_measures_update_swap_and_overlap_against_a_copy(tmp_path) -> None:
    """``scripts/gpu-check`` runs this on CUDA; on the CPU it runs the same code (asynchronous updates fall back)."""
    from emakit.bench import device_report

    path = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="async_update=True needs a model on one CUDA device"):
        code = device_report.main(
            ["--device", "cpu", "--quick", "--repeats", "2", "--layouts", "convnet", "--json", str(path)]
        )
    assert code == 0
    report = json.loads(path.read_text())
    layout = report["layouts"]["convnet"]
    assert layout["numel"] > 0 and layout["copy_GBps"] > 0
    for mode in ("default", "flatten_model"):
        assert layout[mode]["update_fraction_of_copy_bandwidth"] > 0 and layout[mode]["swap_vs_one_copy"] > 0
    assert {"none_s", "sync_s", "async_s", "hidden"} <= set(report["overlap"])


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path) -> None:
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu-check would run")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
    result = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "torch sees no CUDA device" in result.stderr


def test_quick_bench_measures_sharded_averages_per_rank_against_the_whole_one(results: dict) -> None:
    """2 processes: shard_over_ranks and (torch 2.9+) FSDP2 shards, each rank's part against the whole average."""
    ranks = results["ranks"]
    assert ranks["ranks"] == 2 and sorted(row["rank"] for row in ranks["per_rank"]) == [0, 1]
    assert ranks["kinds"][:2] == ["whole", "shard_over_ranks"]
    for kind in ranks["kinds"]:
        for row in ranks["per_rank"]:
            assert row[f"{kind}_update_s"] > 0 and row[f"{kind}_swap_s"] > 0
        assert ranks[f"{kind}_update_s"] == max(row[f"{kind}_update_s"] for row in ranks["per_rank"])
    for kind in ranks["kinds"][1:]:
        for row in ranks["per_rank"]:  # each rank holds about half (tiny quick tensors: padding on top)
            assert 0.45 < row[f"{kind}_bytes"] / row["whole_bytes"] < 0.6, (kind, row)
        assert ranks[f"{kind}_update_ratio"] == pytest.approx(ranks[f"{kind}_update_s"] / ranks["whole_update_s"])
        assert ranks[f"{kind}_bytes_ratio"] == pytest.approx(ranks[f"{kind}_bytes"] / ranks["whole_bytes"])
        assert ranks["targets"][kind] == targets.RANK_BYTES.judge(ranks[f"{kind}_bytes_ratio"])
