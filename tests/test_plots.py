"""The demo's plots explain themselves: labelled axes, a log scale only where the values span
decades, smoothed per-step noise, the legend outside the panels, a title that fits."""

import math

import pytest
import torch

from fused_mtl.app import demo, plots


@pytest.fixture(scope="module")
def problem_and_runs():
    problem = demo.make_problem("gradnorm_toy", 0)
    runs = [demo.train(problem, method, 30, 0) for method in ("mgda", "gradnorm", "rlw")]
    return problem, runs


def test_log_scale_only_when_the_values_span_more_than_two_decades():
    assert not plots.uses_log_scale(torch.tensor([0.8, 1.3, 1.05]))  # DWA-like, narrow
    assert not plots.uses_log_scale(torch.tensor([0.02, 1.9]))  # under two decades
    assert plots.uses_log_scale(torch.tensor([1e-6, 1.0, 3.0]))  # GradNorm's floor
    assert not plots.uses_log_scale(torch.tensor([-0.1, 1e-6, 3.0]))  # a negative weight


def test_only_a_noisy_series_is_smoothed_and_the_average_keeps_its_level():
    steps = torch.arange(200, dtype=torch.float64)
    assert not plots.is_noisy(1 + steps / 200)  # a trend
    gen = torch.Generator().manual_seed(0)
    noisy = 0.25 + 0.1 * torch.rand(200, generator=gen, dtype=torch.float64)
    assert plots.is_noisy(noisy)
    torch.testing.assert_close(
        plots.moving_average(torch.full((50,), 0.3, dtype=torch.float64), 5),
        torch.full((50,), 0.3, dtype=torch.float64),
    )
    line = plots.moving_average(steps, 5)
    torch.testing.assert_close(line[2:-2], steps[2:-2])  # a centred window keeps a line
    smoothed = plots.moving_average(noisy, 9)
    assert float(smoothed.diff().abs().mean()) < 0.5 * float(noisy.diff().abs().mean())


@pytest.mark.parametrize("quantity", list(plots.QUANTITIES))
def test_every_panel_is_labelled_and_the_legend_sits_outside(problem_and_runs, quantity):
    problem, runs = problem_and_runs
    drawing = plots.figure(problem, runs, quantity)
    panels = [ax for ax in drawing.axes if ax.get_visible()]
    assert len(panels) == len(runs)
    for ax, run in zip(panels, runs, strict=True):
        assert ax.get_ylabel().startswith(plots.AXIS_LABELS[quantity])
        assert ax.get_title().startswith(demo.METHODS[run.method])
        assert ax.get_legend() is None  # no legend over the data
        assert ax.get_xlabel() == "training step"  # each column's lowest panel: all of them here
        values = getattr(run, quantity)
        log = ax.get_yscale() == "log"
        assert log == plots.uses_log_scale(values.double())
        assert ax.get_ylabel().endswith("(log)") == log
    (legend,) = drawing.legends
    assert next(text.get_text() for text in legend.get_texts()).startswith("task 0")


def test_weights_of_a_random_method_are_drawn_smoothed_and_raw(problem_and_runs):
    problem, runs = problem_and_runs
    drawing = plots.figure(problem, runs, "weights")
    rlw = next(ax for ax in drawing.axes if ax.get_title().startswith(demo.METHODS["rlw"]))
    assert "smoothed" in rlw.get_title()
    assert len(rlw.get_lines()) == 2 * problem.num_tasks  # raw (faint) and averaged
    gradnorm = [ax for ax in drawing.axes if ax.get_title().startswith(demo.METHODS["gradnorm"])]
    assert "smoothed" not in gradnorm[0].get_title()


def test_a_one_method_title_wraps_to_the_figure(problem_and_runs):
    problem, runs = problem_and_runs
    drawing = plots.figure(problem, runs[:1], "weights")
    width_inches = drawing.get_size_inches()[0]
    lines = drawing._suptitle.get_text().splitlines()
    assert len(lines) >= 2
    assert all(len(line) <= math.floor(width_inches * 11) for line in lines)
