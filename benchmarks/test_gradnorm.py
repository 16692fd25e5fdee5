"""GradNorm step and the per-task gradient norms / Gram: fused vs what users run today.

Run: ``pytest benchmarks/test_gradnorm.py``. Compare within a group; the norms / Gram cases also
record the achieved bandwidth (bytes of gradients read per second) in ``extra_info``.
"""

import pytest
import torch
from gradnorm_cases import (
    GRADNORM_IMPLEMENTATIONS,
    GRAM_BASELINES,
    make_gradnorm_step,
    make_gram_case,
)

# P per task: on a GPU up to 64 M gradient elements; on a 2-core CPU smaller, to keep the suite
# to a few minutes.
WIDTHS = [1 << 20, 1 << 24, 1 << 26] if torch.cuda.is_available() else [1 << 16, 1 << 20]


@pytest.mark.parametrize("implementation", GRADNORM_IMPLEMENTATIONS)
def test_gradnorm_step(benchmark, record_environment, implementation):
    num_tasks = 8
    benchmark.group = f"gradnorm step K={num_tasks}"
    step = make_gradnorm_step(implementation, num_tasks, record_environment)
    for _ in range(5):  # warm-up: the first call chooses the gradient mode; kernels compile
        step()
    benchmark(step)


@pytest.mark.parametrize("implementation", ["fused_auto", "baseline"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_tasks", [2, 8, 16])
@pytest.mark.parametrize("op", ["norms", "gram"])
def test_norms_and_gram(benchmark, record_environment, op, num_tasks, width, implementation):
    benchmark.group = f"{op} K={num_tasks} P={width}"
    if implementation == "baseline":
        implementation = GRAM_BASELINES[op]
    step, bytes_read = make_gram_case(op, implementation, num_tasks, width, record_environment)
    for _ in range(3):
        step()
    benchmark(step)
    benchmark.extra_info["implementation"] = implementation
    benchmark.extra_info["bytes_read"] = bytes_read
    benchmark.extra_info["gb_per_s"] = bytes_read / benchmark.stats.stats.median / 1e9
