"""Every Gram solver at K = 256 tasks: finite weights and each method's defining property, on a
random well-conditioned Gram and a rank-deficient one (rank K / 4), in float64.

Time and peak memory of one call at K = 256 on a 2-core CPU (torch 2.13, float64 Gram of
``(K, 4K)`` gradients; peak resident memory of a fresh process after the call minus before it;
``python benchmarks/solver_cost.py METHOD 256 KIND``), well-conditioned / rank K / 4:

============  ===================  ===================
solver        well-conditioned     rank K / 4
============  ===================  ===================
MGDA          0.03 s, +25 MiB      0.03 s, +24 MiB
UPGrad        2.5 s, +545 MiB      2.8 s, +537 MiB
DualProj      0.01 s, +13 MiB      0.01 s, +14 MiB
CAGrad        0.06 s, +24 MiB      0.06 s, +21 MiB
Nash-MTL      0.01 s, +14 MiB      0.05 s, +15 MiB
FairGrad      0.01 s, +15 MiB      0.05 s, +13 MiB
IMTL-G        <0.01 s, +11 MiB     <0.01 s, +12 MiB
Aligned-MTL   0.01 s, +12 MiB      0.01 s, +11 MiB
ConFIG        0.01 s, +12 MiB      0.01 s, +12 MiB
PCGrad        0.15 s, +9 MiB       0.10 s, +11 MiB
GradVac       0.18 s, +12 MiB      0.13 s, +10 MiB
SDMGrad       <0.01 s, +5 MiB      <0.01 s, +5 MiB
MoCo, MoDo    <0.01 s, +4 MiB      <0.01 s, +4 MiB
============  ===================  ===================

UPGrad (K projections onto the dual cone, each a quadratic program over K bounds) held every
polish candidate of every projection at once before: 12 x K^3 numbers and their
factorisations, 1.0 s and +842 MiB at K = 128 (now 0.19 s, +79 MiB), 19 s and +6.2 GiB at
K = 256. This file takes about 10 s.
"""

import gram_formulas as formulas
import pytest
import torch

from fused_mtl.reference import gram_weights, solvers, stochastic

K = 256


def jacobian(kind, num_tasks=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "well":
        return torch.randn(num_tasks, 4 * num_tasks, generator=gen, dtype=torch.float64)
    rank = num_tasks // 4
    left = torch.randn(num_tasks, rank, generator=gen, dtype=torch.float64)
    return left @ torch.randn(rank, 4 * num_tasks, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The file runs on one thread: with torch's threads on a 2-core CPU, MKL's threaded LU
    factorisation of the K = 256 systems (inside torch's threaded batch loop) reported DLASWP
    parameter errors and did not return; on one thread each solver takes the time above."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["well", "rank-deficient"])
def problem(request):
    J = jacobian("well" if request.param == "well" else "rank")
    return request.param, J, J @ J.T


def test_mgda_meets_the_min_norm_kkt_conditions(problem):
    _, _, gram = problem
    alpha = solvers.min_norm_weights(gram)
    assert torch.isfinite(alpha).all() and float(alpha.min()) >= 0
    assert abs(float(alpha.sum()) - 1) <= 1e-12
    slopes = gram @ alpha
    # Frank-Wolfe gap: the distance to the optimum's objective is below it.
    assert float(alpha @ slopes - slopes.min()) <= 1e-8 * float(gram.diagonal().max())


def assert_projections(gram, preferences, weights, certified_rows):
    """``G^T w`` in the dual cone (``M w >= 0``) for every row; the rows expected certified meet
    the projection's optimality conditions: ``w >= u``, ``M w >= 0``, ``(w - u)_i (M w)_i = 0``."""
    assert torch.isfinite(weights).all()
    size = float(gram.diagonal().max()) * float(weights.abs().max() + preferences.abs().max())
    products = weights @ gram
    assert float(products.min()) >= -1e-10 * size
    nonzero = weights.abs().sum(dim=1) > 0
    assert int(nonzero.sum()) >= certified_rows
    if not nonzero.any():
        return
    excess = (weights - preferences)[nonzero]
    assert float(excess.min()) >= -1e-12 * float(weights.abs().max() + 1)
    assert float((excess * products[nonzero]).abs().max()) <= 1e-9 * size


def test_upgrad_projections_are_in_the_dual_cone(problem):
    kind, _, gram = problem
    eye = torch.eye(K, dtype=torch.float64)
    weights = gram_weights.dual_cone_weights(gram, eye)
    # Well-conditioned: every projection certified. Rank K / 4: the free sets stay unclear (see
    # dual_cone_weights) and uncertified projections are 0, which conflicts with no task.
    assert_projections(gram, eye, weights, K if kind == "well" else 0)


def test_dualproj_projection_is_in_the_dual_cone(problem):
    kind, _, gram = problem
    mean = torch.full((1, K), 1 / K, dtype=torch.float64)
    weights = gram_weights.dual_cone_weights(gram, mean)
    assert_projections(gram, mean, weights, 1 if kind == "well" else 0)
    assert torch.equal(gram_weights.dualproj_weights(gram), weights[0])


def test_cagrad_update_is_on_its_ball(problem):
    _, _, gram = problem
    weights = gram_weights.cagrad_weights(gram, 0.4)
    assert torch.isfinite(weights).all()
    uniform = torch.full((K,), 1 / K, dtype=torch.float64)
    radius = 0.4 * float(uniform @ gram @ uniform) ** 0.5
    step = weights - uniform  # r g_w / ||g_w||, of norm r
    assert abs(float(step @ gram @ step) ** 0.5 - radius) <= 1e-8 * radius


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_fair_weights_solve_their_condition(problem, alpha):
    kind, _, gram = problem
    weights = gram_weights.fair_weights(gram, alpha)
    assert torch.isfinite(weights).all() and float(weights.min()) > 0
    if kind == "well":  # rank-deficient gradients have no solution (see fair_weights)
        target = weights ** (-1 / alpha)
        assert float(((gram @ weights - target) / target).abs().max()) <= 1e-6


def test_imtl_g_projects_equally_on_every_unit_gradient(problem):
    kind, _, gram = problem
    weights = gram_weights.imtl_g_weights(gram)
    assert torch.isfinite(weights).all() and abs(float(weights.sum()) - 1) <= 1e-10
    if kind == "well":
        projections = (gram @ weights) / gram.diagonal().sqrt()
        assert float(projections.max() - projections.min()) <= 1e-8 * float(projections.abs().max())


def test_config_has_equal_cosines_with_every_task(problem):
    kind, _, gram = problem
    weights = gram_weights.config_weights(gram)
    assert torch.isfinite(weights).all()
    if kind == "well":
        cosines = (gram @ weights) / gram.diagonal().sqrt() / float(weights @ gram @ weights) ** 0.5
        assert float(cosines.max() - cosines.min()) <= 1e-8


def test_aligned_mtl_update_has_equal_singular_values(problem):
    """``w^T M w = sigma_min^2 |P 1|^2``: the aligned rows are orthogonal, each of length
    ``sigma_min``, in the span ``P`` of the significant singular directions."""
    _, _, gram = problem
    weights = gram_weights.aligned_mtl_weights(gram)
    assert torch.isfinite(weights).all()
    values, vectors = torch.linalg.eigh(gram)
    significant = values > values.max() * K * 1e-13
    span = vectors[:, significant]
    expected = float(values[significant].min()) * float(
        (span.T @ torch.ones(K, dtype=torch.float64)).square().sum()
    )
    assert abs(float(weights @ gram @ weights) - expected) <= 1e-8 * expected


def test_pcgrad_and_gradvac_are_finite(problem):
    _, _, gram = problem
    torch.manual_seed(0)
    orders = gram_weights.projection_orders(K)
    assert torch.isfinite(gram_weights.pcgrad_weights(gram, orders)).all()
    weights, targets = gram_weights.gradvac_weights(gram, orders, torch.zeros(K, K), 0.5)
    assert torch.isfinite(weights).all() and torch.isfinite(targets).all()


def test_stochastic_weights_stay_on_the_simplex(problem):
    _, _, gram = problem
    uniform = torch.full((K,), 1 / K, dtype=torch.float64)
    for weights in (
        stochastic.sdmgrad_lambdas(uniform, gram, 0.3, 20),
        stochastic.moco_lambdas(uniform, gram, 0.1, 0.0),
        stochastic.modo_lambdas(uniform, gram, 1e-3, 0.1),
    ):
        assert torch.isfinite(weights).all() and float(weights.min()) >= 0
        assert abs(float(weights.sum()) - 1) <= 1e-12


@pytest.mark.parametrize("method", ["upgrad", "dualproj"])
def test_dual_cone_beyond_the_enumeration_is_the_primal_projection(method):
    """K = 11, the interior point's first size: the update equals the projections computed in
    the primal by active-set enumeration (``gram_formulas``), conflicting tasks and norms 100x
    apart included."""
    J = jacobian("well", 11, seed=3)[:, :30]
    J[1] = -0.8 * J[0] + 0.3 * J[1]
    J = J * torch.logspace(0, 2, 11, dtype=torch.float64)[:, None]
    expected, _ = getattr(formulas, method)(J)
    weights = getattr(gram_weights, f"{method}_weights")(J @ J.T)
    scale = float(J.norm(dim=1).max())
    assert float((J.T @ weights - expected).abs().max()) <= 1e-9 * scale


def test_dual_cone_systems_hold_at_most_k_cubed_numbers(monkeypatch):
    """The memory of the dual-cone projections is O(K^3): no batch of linear systems larger
    than the B = K problems' K x K systems at once (before: the polish solved every threshold's
    candidates together, 12 K^3 numbers, 6.2 GiB at K = 256)."""
    largest = []
    for name in ("solve_ex", "lu_factor_ex"):
        original = getattr(torch.linalg, name)

        def recording(systems, *args, original=original, **kwargs):
            largest.append(systems.numel())
            return original(systems, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, recording)
    gram = jacobian("rank", 64) @ jacobian("rank", 64).T
    gram_weights.upgrad_weights(gram)
    assert largest and max(largest) <= 64**3
