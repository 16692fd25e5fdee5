"""The demo's plots: one panel per method, one line per task. Needs matplotlib (the ``demo``
extra); it is imported here only, through its object API, so no GUI backend or global pyplot
state is involved.

Each panel has its quantity on a labelled y axis, linear unless the values span more than two
decades (then logarithmic, and the axis label says so). A per-step series whose noise hides its
trend (MGDA's or RLW's weights change every step) is drawn faintly as it is, with its moving
average on top. The legend sits above the panels, outside the data, and the title wraps to the
figure's width.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fused_mtl.app.compare import Comparison
from fused_mtl.app.demo import METHODS, MethodRun, Problem

QUANTITIES = {
    "weights": "weight each step used (as the method reports it; MGDA's sum to 1)",
    "loss_ratios": "test loss L_i(t) / L_i(0)",
}
AXIS_LABELS = {"weights": "task weight", "loss_ratios": "L_i(t) / L_i(0)"}
#: Above this ratio of the largest to the smallest value a panel is drawn on a log scale.
LOG_SCALE_RATIO = 100.0
#: A series is smoothed when its mean step-to-step change exceeds this share of its range.
NOISE_SHARE = 0.05
#: The moving average spans this share of the steps.
SMOOTHING_SHARE = 0.02
COLUMNS = 4
PANEL_SIZE = (3.6, 2.6)  # inches per panel


def uses_log_scale(values: torch.Tensor) -> bool:
    """Whether ``values`` (all of a panel's) span more than ``LOG_SCALE_RATIO``; never for a
    panel with a value at or below 0 (IMTL-G's and PCGrad's weights can be)."""
    if not bool((values > 0).all()):
        return False
    return float(values.max() / values.min()) > LOG_SCALE_RATIO


def is_noisy(series: torch.Tensor) -> bool:
    """Whether the per-step changes of ``series`` are large against its range."""
    if series.numel() < 20:
        return False
    spread = float(series.max() - series.min())
    return spread > 0 and float(series.diff().abs().mean()) > NOISE_SHARE * spread


def moving_average(series: torch.Tensor, window: int) -> torch.Tensor:
    """The mean of each window of ``window`` values, centred (shorter at the ends)."""
    padded = torch.cat([torch.zeros(1, dtype=torch.float64), series.double().cumsum(0)])
    index = torch.arange(series.numel())
    low = (index - window // 2).clamp_min(0)
    high = (index + window // 2 + 1).clamp_max(series.numel())
    return ((padded[high] - padded[low]) / (high - low)).to(series.dtype)


def _mark_the_lowest(ax: object, steps: Sequence[int], values: torch.Tensor) -> None:
    """Name the lowest value on a log-scale panel: what stretched its axis over the decades
    (GradNorm's weights can touch their floor of 1e-6)."""
    flat = int(values.argmin())
    step, task = divmod(flat, values.shape[1])
    lowest = float(values[step, task])
    ax.text(  # type: ignore[attr-defined]
        0.98,
        0.03,
        f"lowest: {lowest:.1e} (task {task}, step {list(steps)[step]})",
        transform=ax.transAxes,  # type: ignore[attr-defined]
        fontsize=7,
        horizontalalignment="right",
    )


def _task_label(problem: Problem, task: int) -> str:
    noise = problem.train.noise_variances
    if noise is not None:
        return f"task {task} (noise var {float(noise[task]):g})"
    return f"task {task} (scale {float(problem.train.sigmas[task]):.3g})"


def plot(problem: Problem, runs: Sequence[MethodRun], quantity: str, path: Path) -> None:
    """Write a PNG of ``quantity`` ("weights" or "loss_ratios") over the training steps."""
    figure(problem, runs, quantity).savefig(path, dpi=90)


def figure(problem: Problem, runs: Sequence[MethodRun], quantity: str) -> Figure:
    """The figure of :func:`plot`."""
    columns = min(COLUMNS, len(runs))
    rows = -(-len(runs) // columns)
    width = max(PANEL_SIZE[0] * columns, 6.0)
    drawing = Figure(figsize=(width, PANEL_SIZE[1] * rows + 1.4), layout="constrained")
    axes = drawing.subplots(rows, columns, squeeze=False, sharex=True)
    colours = [f"C{task}" for task in range(problem.num_tasks)]
    for ax, run in zip(axes.flat, runs, strict=False):
        values = getattr(run, quantity).double()
        steps = range(1, values.shape[0] + 1) if quantity == "weights" else run.evaluation_steps
        log_scale = uses_log_scale(values)
        smoothed = False
        for task in range(values.shape[1]):
            series = values[:, task]
            label = _task_label(problem, task)
            if quantity == "weights" and is_noisy(series):
                smoothed = True
                ax.plot(steps, series.numpy(), color=colours[task], linewidth=0.5, alpha=0.25)
                window = max(3, int(SMOOTHING_SHARE * series.numel()))
                series = moving_average(series, window)
            ax.plot(steps, series.numpy(), color=colours[task], linewidth=1.3, label=label)
        ax.set_yscale("log" if log_scale else "linear")
        if log_scale:
            _mark_the_lowest(ax, steps, values)
        title = METHODS[run.method] + (" (smoothed; raw faint)" if smoothed else "")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(AXIS_LABELS[quantity] + (" (log)" if log_scale else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    for column in range(columns):
        # The lowest drawn panel of each column carries the step axis.
        lowest = axes[max(row for row in range(rows) if row * columns + column < len(runs))][column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("training step", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    drawing.legend(
        handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False
    )
    title = f"{problem.description}: {QUANTITIES[quantity]}"
    # About 11 characters of an 11-point title per inch of figure.
    drawing.suptitle(textwrap.fill(title, width=int(width * 11)), fontsize=11)
    return drawing


def plot_delta_m(
    comparisons: Mapping[str, Comparison], descriptions: Mapping[str, str], path: Path
) -> None:
    """Write a PNG of each method's Δm% on each problem (``fused-mtl compare``)."""
    delta_m_figure(comparisons, descriptions).savefig(path, dpi=90)


def delta_m_figure(
    comparisons: Mapping[str, Comparison], descriptions: Mapping[str, str]
) -> Figure:
    """One panel per problem, one row per method: its seeds' Δm% as dots, their mean as a bar
    with the standard deviation as a whisker; the single-task models' spread around 0 shaded
    (the noise floor)."""
    from fused_mtl.app.compare_report import method_label

    count = len(comparisons)
    methods = max(len(comparison.runs) for comparison in comparisons.values())
    drawing = Figure(figsize=(4.6 * count, 0.32 * methods + 1.6), layout="constrained")
    axes = drawing.subplots(1, count, squeeze=False, sharey=True)[0]
    for ax, (name, comparison) in zip(axes, comparisons.items(), strict=True):
        rows = comparison.rows()
        labels = [method_label(row["method"]) for row in rows]
        positions = list(range(len(rows)))
        floor = rows[0]["delta_m_std"]  # the single-task row comes first; NaN for one seed
        measured = not math.isnan(floor)
        if measured:
            ax.axvspan(-floor, floor, color="0.85", zorder=0, label="single-task ± std")
        ax.axvline(0, color="0.4", linewidth=0.8)
        means = [row["delta_m"] for row in rows]
        colours = [
            "C7" if not measured else "C2" if mean > floor else "C3" if mean < -floor else "C7"
            for mean in means
        ]
        ax.barh(
            positions,
            means,
            xerr=[0.0 if math.isnan(row["delta_m_std"]) else row["delta_m_std"] for row in rows],
            color=colours,
            alpha=0.6,
            height=0.6,
            error_kw={"linewidth": 0.8, "capsize": 2},
        )
        for position, row in zip(positions, rows, strict=True):
            seeds = row["delta_m_per_seed"]
            ax.plot(seeds, [position] * len(seeds), "k.", markersize=3)
            if row["not_run"]:  # the panels share their rows: the label is the other panels'
                ax.text(
                    0.02,
                    position,
                    "not run",
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    fontsize=7,
                    color="0.3",
                )
        ax.set_yticks(positions, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("Δm% against single-task models (higher is better)", fontsize=8)
        ax.set_title(textwrap.fill(f"{name}: {descriptions[name]}", 48), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    title = (
        "fused-mtl compare: Δm% per method (bar: mean over seeds, whisker: std, dots: seeds; "
        "shaded: the single-task models' spread, green/red bars lie beyond it)"
    )
    drawing.suptitle(textwrap.fill(title, width=int(4.6 * count * 11)), fontsize=10)
    return drawing
