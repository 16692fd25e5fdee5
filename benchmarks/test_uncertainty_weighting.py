"""Uncertainty weighting, forward + backward: fused op vs torch fallback vs per-task loop.

Run: ``pytest benchmarks/`` (``--benchmark-json out.json`` to keep the numbers). The device is
CUDA when available, else CPU (set ``FUSED_MTL_BENCH_DEVICE`` to choose). Compare within a group.
"""

import pytest
from uncertainty_cases import IMPLEMENTATIONS, make_case

NUM_TASKS = [2, 8, 64, 256]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_forward_backward(benchmark, record_environment, implementation, num_tasks):
    benchmark.group = f"uncertainty fwd+bwd K={num_tasks}"
    step = make_case(implementation, num_tasks, record_environment)
    for _ in range(5):  # warm-up: kernel compilation, allocator
        step()
    benchmark(step)
