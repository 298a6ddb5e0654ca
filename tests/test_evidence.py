"""``emakit evidence``: each dataset's code path run short, its JSON/Markdown/PNG, and the statistics by hand.

The committed study (docs/evidence.md) runs the tasks' full lengths; these runs are a few hundred steps
with one seed, enough to drive every code path and check the outputs agree with each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

import torch

from emakit.cli import main
from emakit.evidence import DEFAULT_HALF_LIVES, charlm, report, tasks
from emakit.evidence.runs import train_once

HALF_LIVES = ("20ba", "100ba")
SHORT = {"digits": (114, 57), "mnist1d": (200, 50), "shakespeare-char": (100, 50)}


def _cli(*argv: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evidence", *argv]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module", params=list(SHORT))
def short_study(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """(dataset, output folder, what was printed) of one seed, both schedules, a few hundred steps."""
    name = request.param
    steps, every = SHORT[name]
    out = tmp_path_factory.mktemp(name)
    printed = _cli(name, "--seeds", "3", "--steps", str(steps), "--eval-every", str(every),
                   "--half-lives", ",".join(HALF_LIVES), "--out", str(out))  # fmt: skip
    return name, out, printed


def test_the_json_holds_every_curve_at_every_evaluation(short_study: tuple[str, Path, str]) -> None:
    name, out, _ = short_study
    result = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    task = tasks.TASKS[name]
    assert (result["dataset"], result["metric"], result["higher_is_better"]) == (
        name,
        task.metric,
        task.higher_is_better,
    )
    steps, every = SHORT[name]
    assert {run["schedule"] for run in result["runs"]} == set(task.schedules)
    for run in result["runs"]:
        assert run["seed"] == 3
        assert run["steps"] == list(range(every, steps + 1, every))
        assert list(run["curves"]) == ["training", *(f"ema@{h}" for h in HALF_LIVES)]
        for curve in run["curves"].values():
            assert len(curve) == len(run["steps"])
            assert all(math.isfinite(v) for v in curve)
            if task.metric == "accuracy":
                assert all(0.0 <= v <= 1.0 for v in curve)


def test_the_table_and_summary_agree_with_the_curves(short_study: tuple[str, Path, str]) -> None:
    name, out, printed = short_study
    result = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    table = (out / f"{name}.md").read_text(encoding="utf-8")
    assert table in printed
    for run in result["runs"]:
        part = result["summary"][run["schedule"]]
        for label, curve in run["curves"].items():
            final = part["curves"][label]["final"]
            assert final["mean"] == curve[-1] and final["std"] == 0.0 and final["n"] == 1
            shown = f"{curve[-1] * 100:.2f}" if result["metric"] == "accuracy" else f"{curve[-1]:.4f}"
            section = table.split(f"### {run['schedule']} learning rate")[1]
            row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
            assert row.split(" | ")[1].startswith(shown)
        for label in list(run["curves"])[1:]:
            difference = part["vs_training"][label]["final"]["mean"]
            assert difference == pytest.approx(run["curves"][label][-1] - run["curves"]["training"][-1], abs=1e-12)


def test_the_plot_is_a_png(short_study: tuple[str, Path, str]) -> None:
    name, out, _ = short_study
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_redoes_table_and_plot_from_the_json(short_study: tuple[str, Path, str]) -> None:
    name, out, _ = short_study
    table = (out / f"{name}.md").read_text(encoding="utf-8")
    (out / f"{name}.md").unlink()
    (out / f"{name}.png").unlink()
    _cli(name, "--report-only", "--out", str(out))
    assert (out / f"{name}.md").read_text(encoding="utf-8") == table
    assert (out / f"{name}.png").exists()


def test_embed_replaces_only_its_section_and_refuses_a_doc_without_one(short_study: tuple[str, Path, str]) -> None:
    name, out, _ = short_study
    doc = out / "doc.md"
    doc.write_text(f"intro\n<!-- evidence:{name} -->\nold\n<!-- /evidence -->\noutro\n", encoding="utf-8")
    _cli(name, "--report-only", "--out", str(out), "--embed", str(doc))
    text = doc.read_text(encoding="utf-8")
    tables = (out / f"{name}.md").read_text(encoding="utf-8").split("\n", 2)[2]
    assert text == f"intro\n<!-- evidence:{name} -->\n{tables}\n<!-- /evidence -->\noutro\n"
    doc.write_text("no sections\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"no '<!-- evidence:{name} -->'"):
        _cli(name, "--report-only", "--out", str(out), "--embed", str(doc))


def test_the_averages_never_change_the_training_trajectory() -> None:
    """The "training" curve of a run with three averages is, bit for bit, the curve of a run without EMA."""
    task = tasks.TASKS["mnist1d"]
    with_ema = train_once(task, 1, "cosine", ("10ba", "50ba", "1000ba"), steps=120, eval_every=20)
    without = train_once(task, 1, "cosine", (), steps=120, eval_every=20)
    assert list(without["curves"]) == ["training"]
    assert with_ema["steps"] == without["steps"]
    assert with_ema["curves"]["training"] == without["curves"]["training"]
    assert with_ema["curves"]["ema@10ba"] != with_ema["curves"]["training"]  # the averages did move


def test_curve_statistics_by_hand() -> None:
    steps = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
    values = [0.1, 0.5, 0.4, 0.8, 0.7, 0.9, 0.85, 0.95, 0.9, 0.92, 0.91, 0.93]
    stats = report.curve_statistics(steps, values, higher_is_better=True, target=0.9)
    tail = values[2:]
    assert stats["final"] == 0.93 and stats["best"] == 0.95
    assert stats["middle"] == pytest.approx(statistics.fmean([0.4, 0.8, 0.7, 0.9, 0.85, 0.95, 0.9]))  # steps 30..90
    assert stats["noise"] == pytest.approx(math.sqrt(sum((v - sum(tail) / 10) ** 2 for v in tail) / 10))
    assert stats["jitter"] == pytest.approx(sum(abs(tail[i + 1] - tail[i]) for i in range(9)) / 9)
    assert stats["to_target"] == 60
    lower = report.curve_statistics(steps, values, higher_is_better=False, target=0.3)
    assert (lower["best"], lower["to_target"]) == (0.1, 10)
    assert report.curve_statistics([1, 2], [0.2, 0.1], True, 0.5)["to_target"] is None
    with pytest.raises(ValueError, match="as many steps as values"):
        report.curve_statistics([1, 2], [0.1], True, 0.5)


def test_summary_is_paired_per_seed_with_sample_std() -> None:
    def run(seed: int, training: list[float], ema: list[float]) -> dict[str, Any]:
        return {"seed": seed, "schedule": "constant", "steps": [1, 2], "curves": {"training": training, "ema@9ba": ema}}

    result = {
        "higher_is_better": True,
        "target": 0.5,
        "runs": [run(0, [0.2, 0.6], [0.1, 0.7]), run(1, [0.3, 0.8], [0.2, 0.75])],
    }
    part = report.summarize(result)["constant"]
    assert part["curves"]["training"]["final"]["mean"] == pytest.approx(0.7)
    assert part["curves"]["training"]["final"]["std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert part["vs_training"]["ema@9ba"]["final"]["mean"] == pytest.approx(statistics.fmean([0.1, -0.05]))
    assert part["vs_training"]["ema@9ba"]["to_target"]["mean"] == 0  # both reach 0.5 at step 2
    assert part["ends"] == {"ema@9ba": {"better": 1, "same": 0, "worse": 1}}


def test_learning_rate_schedules_closed_form() -> None:
    factor = tasks.learning_rate_factor
    assert [factor(s, 10, "constant") for s in range(10)] == [1.0] * 10
    assert factor(0, 10, "cosine") == 1.0 and factor(9, 10, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert factor(3, 7, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert factor(4, 200, "cosine", warmup_steps=100, min_ratio=0.1) == pytest.approx(5 / 101)
    assert factor(199, 200, "cosine", warmup_steps=100, min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'linear': allowed are constant, cosine"):
        factor(0, 10, "linear")


def test_mnist1d_data_and_model_are_the_papers() -> None:
    train, test = tasks.mnist1d_data()
    assert train.tensors[0].shape == (4000, 40) and test.tensors[0].shape == (1000, 40)
    assert sorted(train.tensors[1].unique().tolist()) == list(range(10))
    model = tasks.ConvBase()
    assert sum(p.numel() for p in model.parameters()) == 5210
    assert model(train.tensors[0][:3]).shape == (3, 10)


def test_the_shakespeare_text_and_model() -> None:
    text = charlm.corpus()
    assert len(text) == charlm.TEXT_CHARS and len(set(text)) == 77
    assert text.startswith("ALL'S WELL THAT ENDS WELL")
    model = charlm.CharGPT(vocab_size=77)
    assert model.head.weight is model.token_embedding.weight  # tied, as nanoGPT
    tokens = torch.randint(0, 77, (2, charlm.BLOCK_SIZE + 1), generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1], tokens[:, 1:])
    assert model.loss(model(batch), batch).item() == pytest.approx(math.log(77), rel=0.05)  # near uniform at init


def test_a_fetched_file_with_another_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / charlm.SDIST_FILE).write_bytes(b"not the plays")
    with pytest.raises(RuntimeError, match="expected f393d09d"):
        charlm.fetch_sdist(tmp_path)


def test_bad_options_name_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["mnist1d", "--half-lives", "50xx"], "50xx"),
        (["mnist1d", "--schedules", "linear"], "'linear': allowed are constant, cosine"),
        (["mnist1d", "--seeds", "-1"], "seed -1"),
        (["imagenet"], "invalid choice: 'imagenet'"),
    ]:
        with pytest.raises(SystemExit):
            main(["evidence", *argv])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_the_committed_study_is_the_full_one_and_the_doc_shows_its_tables(name: str) -> None:
    """docs/evidence.md's tables are recomputed from the committed JSON, which holds the full study's runs."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    result = json.loads((docs / "evidence" / f"{name}.json").read_text(encoding="utf-8"))
    task, settings = tasks.TASKS[name], result["settings"]
    assert (settings["steps"], settings["eval_every"], settings["warmup"]) == (task.steps, task.eval_every, None)
    assert (settings["seeds"], settings["schedules"]) == (list(task.seeds), list(task.schedules))
    assert settings["half_lives"] == list(DEFAULT_HALF_LIVES)
    assert len(result["runs"]) == len(task.seeds) * len(task.schedules)
    for run in result["runs"]:
        assert run["steps"] == list(range(task.eval_every, task.steps + 1, task.eval_every))
    tables = report.markdown(result).split("\n", 2)[2]
    assert tables in (docs / "evidence.md").read_text(encoding="utf-8")
