"""The min-norm solver over many random problems: the Frank-Wolfe duality gap certifies it.

For ``f(alpha) = alpha^T M alpha`` on the simplex, the gap
``2 (alpha^T M alpha - min_i (M alpha)_i)`` bounds ``f(alpha) - f*`` from above, whatever the
optimum is: it needs no second solver. The problems are built from task gradients ``G``
(``M = G G^T``) of every kind that makes the problem hard: singular values down to 1e-8 (a Gram
condition number of 1e16), rank-deficient, duplicated and opposed gradients, norms spread over
24 decades, and zero gradients.

``python tests/test_solver_properties.py`` prints the worst gap over 2,000 problems of each
path (float64, relative to ``max_i M_ii``).
"""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_mtl.reference import ENUMERATION_MAX_TASKS, min_norm_weights

GAP_RTOL = 1e-8
KINDS = ("random", "ill_conditioned", "rank_deficient", "duplicated", "opposed", "scaled", "zeros")


def task_gradients(kind: str, num_tasks: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind == "ill_conditioned":
        rank = min(num_tasks, width)
        left = torch.linalg.qr(randn(num_tasks, rank))[0]
        right = torch.linalg.qr(randn(width, rank))[0]
        return left @ torch.diag(torch.logspace(0, -8, rank, dtype=torch.float64)) @ right.T
    if kind == "rank_deficient":
        return randn(num_tasks, 3) @ randn(3, width)
    if kind == "duplicated":
        distinct = randn(num_tasks // 2 + 1, width)
        return distinct[torch.randint(0, distinct.shape[0], (num_tasks,), generator=gen)]
    if kind == "opposed":
        half = randn(num_tasks // 2, width)
        return torch.cat([half, -half, randn(num_tasks % 2, width)])
    if kind == "scaled":
        scales = torch.logspace(-12, 12, num_tasks, dtype=torch.float64)
        return randn(num_tasks, width) * scales[torch.randperm(num_tasks, generator=gen)][:, None]
    if kind == "zeros":
        grads = randn(num_tasks, width)
        grads[torch.rand(num_tasks, generator=gen) < 0.5] = 0
        return grads
    return randn(num_tasks, width) + randn(width)  # random, with a shared component


def relative_gap(alpha: torch.Tensor, gram: torch.Tensor) -> float:
    slopes = gram @ alpha
    scale = float(gram.diagonal().max())
    return 2 * float(alpha @ slopes - slopes.min()) / scale if scale > 0 else 0.0


def check(alpha: torch.Tensor, gram: torch.Tensor, what: str) -> float:
    assert alpha.dtype == torch.float64 and alpha.shape == gram.shape[:1], what
    assert bool(torch.isfinite(alpha).all()), f"{what}: {alpha}"
    assert bool((alpha >= 0).all()), f"{what}: negative weight {alpha.min()}"
    assert abs(float(alpha.sum()) - 1) <= 1e-12, f"{what}: weights sum to {alpha.sum()}"
    gap = relative_gap(alpha, gram)
    assert gap <= GAP_RTOL, f"{what}: Frank-Wolfe gap {gap:.3e} of the largest squared norm"
    return gap


problems = st.tuples(
    st.sampled_from(KINDS),
    st.integers(2, 64),
    st.integers(1, 300),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(problems)
def test_the_solver_reaches_a_gap_of_1e_8_for_every_k_up_to_64(problem):
    kind, num_tasks, width, seed = problem
    grads = task_gradients(kind, num_tasks, width, seed)
    gram = grads @ grads.T
    check(min_norm_weights(gram), gram, f"{kind} K={num_tasks} P={width} seed={seed}")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems)
def test_the_interior_point_path_also_solves_small_problems(problem):
    """The path beyond the enumeration limit, forced on K >= 3."""
    kind, num_tasks, width, seed = problem
    grads = task_gradients(kind, max(3, num_tasks), width, seed)
    gram = grads @ grads.T
    with mock.patch("fused_mtl.reference.ENUMERATION_MAX_TASKS", 2):
        alpha = min_norm_weights(gram)
    check(alpha, gram, f"{kind} K={max(3, num_tasks)} P={width} seed={seed}")


def test_the_audits_case_is_solved_exactly():
    """K = 11, singular values 1 to 1e-4: pairwise Frank-Wolfe left 180x the optimum."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        left = torch.linalg.qr(torch.randn(11, 11, generator=gen, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(40, 11, generator=gen, dtype=torch.float64))[0]
        grads = left @ torch.diag(torch.logspace(0, -4, 11, dtype=torch.float64)) @ right.T
        gram = grads @ grads.T
        alpha = min_norm_weights(gram)
        check(alpha, gram, f"seed={seed}")
        # The optimum of a full-rank Gram is unique: the weights, not only the objective, are
        # those of the KKT point, whose Lagrange multiplier is f* (checked to rounding).
        objective = float(alpha @ gram @ alpha)
        slopes = gram @ alpha
        on_support = slopes[alpha > 1e-9]
        assert float((on_support - objective).abs().max()) <= 1e-12 * float(gram.diagonal().max())


@pytest.mark.parametrize("num_tasks", [11, 33, 64])
def test_the_solver_runs_on_the_device_in_float32(device, num_tasks):
    """float32 Gram matrices, as MGDA computes them, on the device: weights in float32 whose
    gap (measured in float64) is at float32 rounding."""
    grads = task_gradients("ill_conditioned", num_tasks, 200, seed=num_tasks)
    gram = (grads @ grads.T).float().to(device)
    alpha = min_norm_weights(gram)
    assert alpha.dtype == torch.float32 and alpha.device == gram.device
    alpha64 = alpha.double().cpu()
    assert abs(float(alpha64.sum()) - 1) <= 1e-6 and bool((alpha64 >= 0).all())
    assert relative_gap(alpha64 / alpha64.sum(), gram.double().cpu()) <= 1e-5


if __name__ == "__main__":
    for label, low, high in (("enumeration", 3, ENUMERATION_MAX_TASKS), ("interior point", 11, 64)):
        worst, where = 0.0, None
        for index in range(2000):
            kind = KINDS[index % len(KINDS)]
            gen = torch.Generator().manual_seed(index)
            num_tasks = int(torch.randint(low, high + 1, (), generator=gen))
            width = int(torch.randint(1, 301, (), generator=gen))
            grads = task_gradients(kind, num_tasks, width, index)
            gram = grads @ grads.T
            gap = relative_gap(min_norm_weights(gram), gram)
            if not math.isfinite(gap) or gap > worst:
                worst, where = gap, (kind, num_tasks, width, index)
        print(f"{label} (K = {low}..{high}): worst gap {worst:.2e} at {where}")
