"""``emakit bench`` runs end to end and reports consistent numbers. Speed itself is never asserted here."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from emakit import bench
from emakit.bench.layouts import ResNet18, convnet_sizes, many_small_sizes
from emakit.bench.peers import Impl, check_closed_form


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
    assert {"emakit.EMA", "emakit.compute_ema", "per_tensor", "torch.AveragedModel"} <= importable
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


def test_quick_bench_reports_swap_eval_memory_and_trainer_overhead(results: dict) -> None:
    for layout in results["layouts"].values():
        swap, memory = layout["swap"], layout["eval_memory"]
        assert swap["swap_s"] > 0 and swap["copy_s"] > 0
        assert swap["ratio"] == pytest.approx(swap["swap_s"] / swap["copy_s"])
        assert memory["model_bytes"] > 0 and memory["extra_bytes"] > 0  # the EMA holds at least its average
        assert memory["ratio"] == pytest.approx(memory["extra_bytes"] / memory["model_bytes"])
    trainer = results["trainer"]
    assert trainer["with_ema_s"] > 0 and trainer["without_ema_s"] > 0 and trainer["ratio"] > 0
    assert trainer["eval_extra_bytes"] > 0 and trainer["eval_model_bytes"] > 0
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
