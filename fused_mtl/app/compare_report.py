"""The tables of ``fused-mtl compare``: the same rows for the terminal and the markdown file.

A problem's table has one row per method: Δm% (mean ± standard deviation over seeds), each
task's test metric (mean ± deviation; accuracies in percent), the selected epochs and the
median seconds of a training epoch. A problem with more than :data:`TASK_COLUMNS` tasks shows
the mean of its tasks' metric instead, and the per-task metrics in a second table. A method
that cannot be built for the problem's tasks has a row marked "not run", and a line below the
table gives its error.

Example:
    >>> signed(1.234, 0.5)
    '+1.23 ± 0.50'
    >>> metric_cell("accuracy", [0.9512, 0.9], 0)
    '95.1'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from fused_mtl.app.compare import SINGLE_TASK, Comparison

__all__ = [
    "TASK_COLUMNS",
    "markdown",
    "markdown_table",
    "method_label",
    "not_run_lines",
    "per_task_table",
    "summary_table",
]

#: Above this many tasks a table shows their mean metric, and the tasks in a table of their own.
TASK_COLUMNS = 4


def method_label(method: str) -> str:
    from fused_mtl.app.demo import METHODS

    return "single-task models" if method == SINGLE_TASK else METHODS[method]


def signed(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):  # one seed: no spread measured
        return f"{round(mean, 2) + 0.0:+.2f}"
    return f"{round(mean, 2) + 0.0:+.2f} ± {std:.2f}"  # + 0.0: no "-0.00"


def _scale(metric: str) -> float:
    return 100.0 if metric == "accuracy" else 1.0


def metric_label(metric: str) -> str:
    """A metric as a column shows it: accuracies in percent."""
    return "accuracy %" if metric == "accuracy" else metric


def metric_header(task: str, metric: str) -> str:
    return f"{task}: {metric_label(metric)}"


def metric_cell(metric: str, means: Sequence[float], index: int, stds: Sequence[float] = ()) -> str:
    scale = _scale(metric)
    if index >= len(means):
        return "n/a"
    text = f"{scale * means[index]:.1f}" if scale == 100 else f"{means[index]:.4g}"
    if stds and not math.isnan(stds[index]):
        text += f" ± {scale * stds[index]:.1f}" if scale == 100 else f" ± {stds[index]:.3g}"
    return text


def _epochs(comparison: Comparison, method: str) -> str:
    epochs = [run.selected_epoch for run in comparison.runs[method] if run.diverged is None]
    return ", ".join(str(epoch) for epoch in epochs) or "n/a"


def _diverged(row: dict[str, Any]) -> str:
    if row.get("not_run"):
        return " (not run)"
    return "" if not row["diverged"] else f" ({len(row['diverged'])}/{row['seeds']} diverged)"


def not_run_lines(comparison: Comparison) -> list[str]:
    """One line per method not run on ``comparison``'s problem: its error, which names it."""
    return [f"Not run: {reason}" for reason in comparison.not_run.values()]


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def summary_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The header and rows of ``comparison``'s table (see the module docstring)."""
    few = len(comparison.task_names) <= TASK_COLUMNS
    if few:
        task_headers = [
            metric_header(task, metric)
            for task, metric in zip(comparison.task_names, comparison.metric_names, strict=True)
        ]
    else:
        metrics = sorted(set(comparison.metric_names))
        task_headers = [f"mean {metric_label(metric)} of the tasks" for metric in metrics]
    header = ["method", "Δm% (test)", *task_headers, "selected epochs", "s / epoch"]
    rows = []
    for row in comparison.rows():
        cells = [
            method_label(row["method"]) + _diverged(row),
            signed(row["delta_m"], row["delta_m_std"]),
        ]
        if few:
            cells += [
                metric_cell(metric, row["test"], k, row["test_std"])
                for k, metric in enumerate(comparison.metric_names)
            ]
        else:
            for metric in metrics:
                indices = [k for k, name in enumerate(comparison.metric_names) if name == metric]
                mean = [statistics.fmean(row["test"][k] for k in indices)] if row["test"] else []
                cells.append(metric_cell(metric, mean, 0))
        cells += [_epochs(comparison, row["method"]), _seconds(row["seconds_per_epoch"])]
        rows.append(cells)
    return header, rows


def per_task_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Each task's test metric (mean over seeds), one column per task."""
    header = ["method", *comparison.task_names]
    rows = [
        [method_label(row["method"])]
        + [metric_cell(metric, row["test"], k) for k, metric in enumerate(comparison.metric_names)]
        for row in comparison.rows()
    ]
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def markdown(
    comparisons: dict[str, Comparison],
    descriptions: dict[str, str],
    seeds: Sequence[int],
    header_lines: Sequence[str],
) -> str:
    """The whole comparison as markdown: ``header_lines``, then per problem its description,
    its table and (for many tasks) the per-task table."""
    lines = [*header_lines, ""]
    for name, comparison in comparisons.items():
        lines += [f"## {name}: {descriptions[name]}", ""]
        lines += [
            f"{comparison.epochs} epochs, seeds {', '.join(map(str, seeds))}; Δm% against the "
            "single-task models' mean test metrics, mean ± standard deviation over seeds "
            "(the single-task row: each seed against the mean, the noise floor).",
            "",
        ]
        lines += markdown_table(*summary_table(comparison))
        if comparison.not_run:
            lines += ["", *not_run_lines(comparison)]
        if len(comparison.task_names) > TASK_COLUMNS:
            lines += ["", "Each task's test metric, mean over seeds:", ""]
            lines += markdown_table(*per_task_table(comparison))
        lines.append("")
    return "\n".join(lines)
