"""Measure when an EMA helps, on real data: training weights and several averages from the same runs.

``emakit evidence DATASET...`` trains each dataset's task (:mod:`emakit.evidence.tasks`: ``digits``,
``mnist1d``, ``shakespeare-char``) for every seed and learning-rate schedule with one EMA of several
half-lives, evaluates the training weights and every average at every evaluation of the same run
(``Trainer(eval_weights="both")``), and writes to ``--out``:

- ``DATASET.json``: ``{"dataset", "metric", "higher_is_better", "target", "baseline", "settings",
  "runs": [{"seed", "schedule", "steps", "curves": {"training": [...], "ema@50ba": [...]}, "seconds"}],
  "summary"}``;
- ``DATASET.md``: the tables of :mod:`emakit.evidence.report`;
- ``DATASET.png``: the curves, mean over seeds and each seed.

    emakit evidence mnist1d                              # 5 seeds x 2 schedules, ~3 min on 2 cores
    emakit evidence all --out docs/evidence --embed docs/evidence.md   # the study as committed
    emakit evidence digits --seeds 0 --steps 300         # a quick look (not the study's numbers)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from emakit import EMA
from emakit.evidence import report
from emakit.evidence.runs import train_once
from emakit.evidence.tasks import SCHEDULES, TASKS, Task

__all__ = ["TASKS", "add_arguments", "run", "run_study", "write_outputs"]

DEFAULT_HALF_LIVES = ("50ba", "200ba", "1000ba")


def run_study(
    task: Task,
    seeds: Sequence[int] | None = None,
    half_lives: Sequence[str] = DEFAULT_HALF_LIVES,
    *,
    schedules: Sequence[str] | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    warmup: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every (schedule, seed) run of ``task``, as the ``DATASET.json`` document (with its ``summary``)."""
    seeds = task.seeds if seeds is None else tuple(seeds)
    schedules = task.schedules if schedules is None else tuple(schedules)
    started = time.perf_counter()
    runs = []
    for schedule in schedules:
        for seed in seeds:
            runs.append(train_once(task, seed, schedule, half_lives, steps=steps, eval_every=eval_every, warmup=warmup))
            last = runs[-1]
            finals = ", ".join(f"{label} {curve[-1]:.4f}" for label, curve in last["curves"].items())
            progress(f"{task.name} {schedule} seed {seed} ({last['seconds']:.0f} s): final {task.metric} {finals}")
    threads = task.threads or torch.get_num_threads()
    result = {
        "dataset": task.name,
        "description": task.description,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "target": task.target,
        "baseline": list(task.baseline) if task.baseline else None,
        "settings": {
            "steps": task.steps if steps is None else steps,
            "eval_every": task.eval_every if eval_every is None else eval_every,
            "half_lives": list(half_lives),
            "warmup": warmup,
            "seeds": list(seeds),
            "schedules": list(schedules),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads",
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
        "runs": runs,
    }
    result["summary"] = report.summarize(result)
    return result


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """``DATASET.json``, ``DATASET.md`` and ``DATASET.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{result['dataset']}.{suffix}" for suffix in ("json", "md", "png")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(report.markdown(result, result["summary"]), encoding="utf-8")
    report.plot(result, paths[2])
    return paths


def embed(document: Path, result: dict[str, Any]) -> None:
    """Put ``result``'s tables into ``document`` between ``<!-- evidence:DATASET -->`` and ``<!-- /evidence -->``."""
    text = document.read_text(encoding="utf-8")
    begin, end = f"<!-- evidence:{result['dataset']} -->", "<!-- /evidence -->"
    head, found, rest = text.partition(begin)
    if not found or end not in rest:
        raise ValueError(f"{document} has no '{begin}' ... '{end}' section for {result['dataset']}'s tables")
    tables = report.markdown(result, result["summary"]).split("\n", 2)[2]  # without the "## DATASET" heading
    document.write_text(f"{head}{begin}\n{tables}\n{end}{rest.partition(end)[2]}", encoding="utf-8")


def _list(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse_list(text: str) -> list[Any]:
        try:
            return [parse(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return parse_list


def _half_life(text: str) -> str:
    EMA(half_life=text)  # raises ValueError naming the bad value
    return text


def _schedule(text: str) -> str:
    if text not in SCHEDULES:
        raise ValueError(f"schedule {text!r}: allowed are {', '.join(SCHEDULES)}")
    return text


def _seed(text: str) -> int:
    if int(text) < 0:
        raise ValueError(f"seed {text}: must be >= 0")
    return int(text)


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``emakit evidence`` options."""
    parser.add_argument(
        "datasets", nargs="+", choices=[*TASKS, "all"], metavar="DATASET", help=f"{', '.join(TASKS)} or all"
    )
    parser.add_argument("--seeds", type=_list(_seed), default=None, help="e.g. 0,1,2 (default: 5; 3 for shakespeare)")
    parser.add_argument(
        "--half-lives", type=_list(_half_life), default=list(DEFAULT_HALF_LIVES), help="default: 50ba,200ba,1000ba"
    )
    parser.add_argument("--schedules", type=_list(_schedule), default=None, help="constant,cosine (default: both)")
    parser.add_argument("--warmup", choices=["tf"], default=None, help="the averages' warmup (default: none)")
    parser.add_argument("--steps", type=_positive, default=None, help="optimizer steps per run (default: the task's)")
    parser.add_argument("--eval-every", type=_positive, default=None, help="steps between evaluations")
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"), help="default: runs/evidence")
    parser.add_argument("--report-only", action="store_true", help="redo DATASET.md/.png from DATASET.json")
    parser.add_argument(
        "--embed", type=Path, default=None, metavar="DOC", help="also put the tables into DOC's evidence sections"
    )


def run(args: argparse.Namespace) -> int:
    """Run the study of each dataset (or re-report it), writing JSON, Markdown and PNG; returns the exit code."""
    names = list(TASKS) if "all" in args.datasets else list(dict.fromkeys(args.datasets))
    report._pyplot()  # fail before training, not after, when matplotlib is missing
    for name in names:
        if args.report_only:
            result = json.loads((args.out / f"{name}.json").read_text(encoding="utf-8"))
            result["summary"] = report.summarize(result)
        else:
            result = run_study(
                TASKS[name],
                args.seeds,
                args.half_lives,
                schedules=args.schedules,
                steps=args.steps,
                eval_every=args.eval_every,
                warmup=args.warmup,
            )
        paths = write_outputs(result, args.out)
        if args.embed is not None:
            embed(args.embed, result)
        print(report.markdown(result, result["summary"]))
        print(f"wrote {', '.join(map(str, paths))}")
    return 0
