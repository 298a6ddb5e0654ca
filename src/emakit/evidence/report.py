"""What a study's runs say: statistics per curve, mean ± std over seeds, a Markdown table and a plot.

Per run and curve (the training weights, each average), with ``T`` the last evaluated step:

- ``final``: the value at the last evaluation; ``best``: the best value at any evaluation;
- ``middle``: the mean over evaluations at steps in ``[0.25 T, 0.75 T]`` (the noisy mid-run phase);
- ``noise``: the standard deviation of the last ``TAIL`` evaluations;
- ``jitter``: the mean absolute change between consecutive evaluations among the last ``TAIL``;
- ``to_target``: the first evaluated step at or past the task's target (``None`` when never).

Each is reported as mean ± sample standard deviation over seeds, and as the difference
"average − training" computed per seed, then averaged (the training weights are a run without EMA,
so the difference is paired: same seed, same data order, same run).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["STATISTICS", "TAIL", "curve_statistics", "markdown", "plot", "summarize"]

TAIL = 10
MIDDLE = (0.25, 0.75)
STATISTICS = ("final", "best", "middle", "noise", "jitter", "to_target")
OUTCOMES = ("better", "same", "worse")


def curve_statistics(
    steps: Sequence[int], values: Sequence[float], higher_is_better: bool, target: float
) -> dict[str, float | None]:
    """The statistics of one curve, as the module docstring defines them.

    Example::

        >>> curve_statistics([1, 2, 3, 4], [0.5, 0.9, 0.7, 0.8], True, 0.85)["to_target"]
        2
    """
    if len(steps) != len(values) or not values:
        raise ValueError(f"a curve needs as many steps as values, at least one: got {len(steps)} and {len(values)}")
    last = steps[-1]
    middle = [v for s, v in zip(steps, values) if MIDDLE[0] * last <= s <= MIDDLE[1] * last] or list(values)
    tail = list(values[-TAIL:])
    reached = (lambda v: v >= target) if higher_is_better else (lambda v: v <= target)
    return {
        "final": values[-1],
        "best": max(values) if higher_is_better else min(values),
        "middle": statistics.fmean(middle),
        "noise": statistics.pstdev(tail),
        "jitter": statistics.fmean(abs(b - a) for a, b in itertools.pairwise(tail)) if len(tail) > 1 else 0.0,
        "to_target": next((s for s, v in zip(steps, values) if reached(v)), None),
    }


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0, "of": len(values)}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present), "of": len(values)}


def _difference(stats: dict[str, Any], label: str, training: str, stat: str) -> float | None:
    mine, theirs = stats[label][stat], stats[training][stat]
    return None if mine is None or theirs is None else mine - theirs


def _outcome(stats: dict[str, Any], label: str, training: str, higher_is_better: bool) -> str:
    mine, theirs = stats[label]["final"], stats[training]["final"]
    if mine == theirs:
        return "same"
    return "better" if (mine > theirs) == higher_is_better else "worse"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """``{schedule: {"curves": {label: {stat: spread}}, "vs_training": {label: {stat: spread}}, "ends", "seeds"}}``.

    A spread is ``{"mean", "std", "n", "of"}``: over the ``n`` of ``of`` seeds where the statistic exists.
    ``ends[label]`` counts the seeds whose average ends better than, the same as, or worse than their
    training weights (``{"better": 3, "same": 1, "worse": 1}``).
    """
    higher, target = result["higher_is_better"], result["target"]
    summary: dict[str, Any] = {}
    for schedule in dict.fromkeys(run["schedule"] for run in result["runs"]):
        runs = [run for run in result["runs"] if run["schedule"] == schedule]
        per_run = [
            {label: curve_statistics(run["steps"], curve, higher, target) for label, curve in run["curves"].items()}
            for run in runs
        ]
        labels = list(runs[0]["curves"])
        curves = {label: {stat: _spread([r[label][stat] for r in per_run]) for stat in STATISTICS} for label in labels}
        averages = labels[1:]
        vs_training = {
            label: {stat: _spread([_difference(r, label, labels[0], stat) for r in per_run]) for stat in STATISTICS}
            for label in averages
        }
        outcomes = {
            label: {o: [_outcome(r, label, labels[0], higher) for r in per_run].count(o) for o in OUTCOMES}
            for label in averages
        }
        summary[schedule] = {"curves": curves, "vs_training": vs_training, "ends": outcomes, "seeds": len(runs)}
    return summary


def _number(value: float, metric: str, signed: bool = False) -> str:
    digits = 2 if metric == "accuracy" else 4
    shown = value * 100 if metric == "accuracy" else value
    return f"{shown:+.{digits}f}" if signed else f"{shown:.{digits}f}"


def _cell(spread: dict[str, Any], stat: str, metric: str, signed: bool = False) -> str:
    if spread["mean"] is None:
        return f"never (0/{spread['of']})"
    if stat == "to_target":
        sign = "+" if signed and spread["mean"] >= 0 else ""
        text = f"{sign}{spread['mean']:.0f} ± {spread['std']:.0f}"
        return text if spread["n"] == spread["of"] else f"{text} ({spread['n']}/{spread['of']})"
    return f"{_number(spread['mean'], metric, signed)} ± {_number(spread['std'], metric)}"


def markdown(result: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """The study's tables as Markdown: per schedule, every curve, then every average minus the training weights."""
    summary = summarize(result) if summary is None else summary
    metric, target = result["metric"], result["target"]
    unit = "accuracy, %" if metric == "accuracy" else metric
    shown_target = f"{target * 100:g}%" if metric == "accuracy" else f"{target:g}"
    headers = [
        f"final ({unit})",
        "best",
        "mean, 25–75% of run",
        f"noise: std of last {TAIL} evals",
        f"jitter: mean abs change, last {TAIL}",
        f"steps to {'≥' if result['higher_is_better'] else '≤'} {shown_target}",
    ]
    lines = [f"## {result['dataset']}", "", result.get("description", ""), ""]
    if "settings" in result:
        settings = result["settings"]
        lines += [
            f"One EMA of half-lives {', '.join(settings['half_lives'])}, warmup {settings['warmup'] or 'none'}; "
            f"evaluated every {settings['eval_every']} of {settings['steps']} steps; "
            f"{settings['wall_seconds'] / 60:.1f} min (torch {settings['torch']}, {settings['machine']}).",
            "",
        ]
    for schedule, part in summary.items():
        lines += [f"### {schedule} learning rate — {part['seeds']} seeds, mean ± std", ""]
        lines += ["| weights | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
        for label, stats in part["curves"].items():
            lines.append(f"| {label} | " + " | ".join(_cell(stats[s], s, metric) for s in STATISTICS) + " |")
        lines += ["", "Average − training, per seed (paired); last column: seeds where the average ends", ""]
        lines += [
            "| average | " + " | ".join(headers) + " | better / same / worse |",
            "|---" * (len(headers) + 2) + "|",
        ]
        for label, stats in part["vs_training"].items():
            cells = " | ".join(_cell(stats[s], s, metric, signed=True) for s in STATISTICS)
            ends = " / ".join(str(part["ends"][label][o]) for o in OUTCOMES)
            lines.append(f"| {label} | {cells} | {ends} |")
        lines.append("")
    return "\n".join(lines)


def _pyplot() -> Any:
    from emakit.demo import import_pyplot

    return import_pyplot()


def _limits(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    margin = 0.1 * (high - low) or 0.01 * abs(high) or 1.0
    return low - margin, high + margin


def plot(result: dict[str, Any], path: Path) -> None:
    """Per schedule (columns), each curve's mean over seeds (thick) and every seed (thin), the baseline dashed;
    the top row shows the whole run, the bottom row its second half, scaled to the training weights and the
    average that ends best."""
    plt = _pyplot()
    schedules = list(dict.fromkeys(run["schedule"] for run in result["runs"]))
    fig, axes = plt.subplots(2, len(schedules), figsize=(6.5 * len(schedules), 8), squeeze=False)
    metric = result["metric"]
    scale = 100 if metric == "accuracy" else 1
    for column, schedule in enumerate(schedules):
        runs = [run for run in result["runs"] if run["schedule"] == schedule]
        steps = runs[0]["steps"]
        whole, late = axes[0][column], axes[1][column]
        focus, late_means = [], {}
        for index, label in enumerate(runs[0]["curves"]):
            mean = [statistics.fmean(run["curves"][label][i] for run in runs) * scale for i in range(len(steps))]
            color = f"C{index}"
            for ax in (whole, late):
                for run in runs:
                    ax.plot(run["steps"], [v * scale for v in run["curves"][label]], color=color, alpha=0.2, lw=0.7)
                ax.plot(steps, mean, color=color, lw=2, label=label)
            focus += [v for s, v in zip(steps, mean) if s >= 0.1 * steps[-1]]
            late_means[label] = [v for s, v in zip(steps, mean) if s >= 0.5 * steps[-1]]
        for ax in (whole, late):
            if result.get("baseline"):
                name, value = result["baseline"]
                ax.axhline(value * scale, color="0.3", ls="--", lw=1, label=f"{name}: {value * scale:g}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"eval {metric}" + (" (%)" if metric == "accuracy" else ""))
            ax.grid(alpha=0.3)
        whole.set_ylim(*_limits(focus))
        whole.set_title(f"{result['dataset']}, {schedule} lr, {len(runs)} seeds")
        whole.legend(fontsize=8)
        late.set_xlim(0.5 * steps[-1], steps[-1] * 1.01)
        training, *averages = late_means.values()
        best = (max if result["higher_is_better"] else min)(averages or [training], key=lambda curve: curve[-1])
        late.set_ylim(*_limits(training + best))
        late.set_title("second half: the training weights and the best average")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
