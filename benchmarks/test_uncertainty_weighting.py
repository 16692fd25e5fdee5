"""Uncertainty weighting, forward + backward over K losses (K scalars, or one (K,) tensor): the
fused op (auto backend), the torch fallback, the per-task loop users copy, a vectorised eager
expression, torch.compile of the loop, and on CUDA a CUDA-graph replay of the fused op, next to
the launch floor (an empty Triton kernel, eager and replayed).

Run: ``pytest benchmarks/`` (``--benchmark-json out.json`` to keep the numbers). Compare within a
group; the compiled loop is timed under ``fail_on_recompile`` and its first call (the compile) is
in ``extra_info["compile_seconds"]``.
"""

import pytest

from fused_mtl.app.benchmark_cases import (
    LAUNCH_FLOOR_IMPLEMENTATIONS,
    UNCERTAINTY_IMPLEMENTATIONS,
    UNCERTAINTY_INPUTS,
    UNCERTAINTY_TASK_COUNTS,
    launch_floor_case,
    uncertainty_case,
)


@pytest.mark.parametrize("implementation", LAUNCH_FLOOR_IMPLEMENTATIONS)
def test_launch_floor(run_case, implementation):
    run_case(lambda device: launch_floor_case(implementation, device))


@pytest.mark.parametrize("implementation", UNCERTAINTY_IMPLEMENTATIONS)
@pytest.mark.parametrize("losses_as", UNCERTAINTY_INPUTS)
@pytest.mark.parametrize("num_tasks", UNCERTAINTY_TASK_COUNTS)
def test_forward_backward(run_case, implementation, losses_as, num_tasks):
    run_case(lambda device: uncertainty_case(implementation, num_tasks, device, losses_as))
