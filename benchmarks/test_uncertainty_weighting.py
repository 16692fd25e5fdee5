"""Uncertainty weighting, forward + backward over K scalar losses: the fused op (auto backend),
the torch fallback, the per-task loop users copy, a vectorised eager expression, torch.compile of
the loop, and on CUDA a CUDA-graph replay of the fused op.

Run: ``pytest benchmarks/`` (``--benchmark-json out.json`` to keep the numbers). Compare within a
group; the compiled loop is timed under ``fail_on_recompile`` and its first call (the compile) is
in ``extra_info["compile_seconds"]``.
"""

import pytest

from fused_mtl.benchmark_cases import (
    UNCERTAINTY_IMPLEMENTATIONS,
    UNCERTAINTY_TASK_COUNTS,
    uncertainty_case,
)


@pytest.mark.parametrize("implementation", UNCERTAINTY_IMPLEMENTATIONS)
@pytest.mark.parametrize("num_tasks", UNCERTAINTY_TASK_COUNTS)
def test_forward_backward(run_case, implementation, num_tasks):
    run_case(lambda device: uncertainty_case(implementation, num_tasks, device))
