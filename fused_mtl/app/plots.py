"""The demo's plots: one panel per method, one line per task. Needs matplotlib (the ``demo``
extra); it is imported here only, through its object API, so no GUI backend or global pyplot
state is involved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from fused_mtl.app.demo import METHODS, MethodRun, Problem

QUANTITIES = {
    "weights": "weight each step used (as the method reports it; MGDA's sum to 1)",
    "loss_ratios": "test loss L_i(t) / L_i(0)",
}


def plot(problem: Problem, runs: Sequence[MethodRun], quantity: str, path: Path) -> None:
    """Write a PNG of ``quantity`` ("weights" or "loss_ratios") over the training steps."""
    columns = min(3, len(runs))
    rows = -(-len(runs) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    noise = problem.train.noise_variances
    for ax, run in zip(axes.flat, runs, strict=False):
        values = getattr(run, quantity)
        steps = range(1, values.shape[0] + 1) if quantity == "weights" else run.evaluation_steps
        for task in range(values.shape[1]):
            if noise is not None:
                label = f"task {task} (noise var {float(noise[task]):g})"
            else:
                label = f"task {task} (scale {float(problem.train.sigmas[task]):.3g})"
            ax.plot(steps, values[:, task].numpy(), label=label, linewidth=1.2)
        # Some methods' weights are negative or zero (IMTL-G, PCGrad): no log scale there.
        ax.set_yscale("log" if bool((values > 0).all()) else "linear")
        ax.set_title(METHODS[run.method], fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{problem.description}: {QUANTITIES[quantity]}", fontsize=11)
    figure.savefig(path, dpi=90)
