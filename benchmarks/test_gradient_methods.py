"""Training steps of the gradient methods and the per-task gradient norms / Gram they use, fused
vs what users run today.

Run: ``pytest benchmarks/test_gradient_methods.py``. Compare within a group; the norms / Gram
cases, and a plain copy of the same matrix, also record the achieved bandwidth (bytes read plus
bytes written, per second) in ``extra_info``.
"""

import pytest
import torch

from fused_mtl.app.benchmark_cases import (
    COMPILED_STEP_IMPLEMENTATIONS,
    COMPILED_STEP_METHODS,
    GRADIENT_STEP_IMPLEMENTATIONS,
    GRAM_BASELINES,
    GRAM_TASK_COUNTS,
    GRAM_WIDTHS,
    STEP_METHODS,
    STEP_TASKS,
    TRUNK_STEP_IMPLEMENTATIONS,
    compiled_step_case,
    copy_case,
    default_device,
    gradient_step_case,
    gram_case,
    method_step_case,
    trunk_cases,
    trunk_step_case,
)

WIDTHS = GRAM_WIDTHS[torch.device(default_device()).type]
GRADIENT_STEPS = [
    (method, implementation)
    for method, implementations in GRADIENT_STEP_IMPLEMENTATIONS.items()
    for implementation in implementations
]


@pytest.mark.parametrize(("method", "implementation"), GRADIENT_STEPS)
def test_gradient_method_step(run_case, method, implementation):
    run_case(lambda device: gradient_step_case(method, implementation, STEP_TASKS, device))


@pytest.mark.parametrize("implementation", TRUNK_STEP_IMPLEMENTATIONS)
@pytest.mark.parametrize(("network", "method", "num_tasks"), trunk_cases())
def test_whole_trunk_step(run_case, network, method, num_tasks, implementation):
    run_case(lambda device: trunk_step_case(network, implementation, num_tasks, device, method))


@pytest.mark.parametrize("method", STEP_METHODS)
def test_method_step(run_case, method):
    run_case(lambda device: method_step_case(method, STEP_TASKS, device))


@pytest.mark.parametrize("implementation", COMPILED_STEP_IMPLEMENTATIONS)
@pytest.mark.parametrize("method", COMPILED_STEP_METHODS)
def test_compiled_step(run_case, method, implementation):
    run_case(lambda device: compiled_step_case(method, implementation, STEP_TASKS, device))


@pytest.mark.parametrize("implementation", ["fused_auto", "baseline"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_tasks", GRAM_TASK_COUNTS)
@pytest.mark.parametrize("op", ["norms", "gram"])
def test_norms_and_gram(run_case, op, num_tasks, width, implementation):
    if implementation == "baseline":
        implementation = GRAM_BASELINES[op]
    run_case(lambda device: gram_case(op, implementation, num_tasks, width, device))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_tasks", GRAM_TASK_COUNTS)
def test_copy(run_case, num_tasks, width):
    run_case(lambda device: copy_case(num_tasks, width, device))
