"""The Gram-family methods against float64 references written from each paper's definition.

``gram_formulas`` works on the K x P gradient matrix itself (projections, SVDs, primal solvers),
never on the Gram matrix the package solves from, so a wrong reduction to inner products fails
here. Three levels: the weights from a Gram matrix (random, conflicting and badly scaled
problems), the whole ``backward`` on a float64 model (shared ``.grad`` is the update, each head
gets ``w_i grad L_i``), and properties over many random problems up to K = 64.
"""

import copy
from pathlib import Path

import gram_formulas as formulas
import pytest
import torch
from torch import nn

import fused_mtl
from fused_mtl.reference import gram_weights

# The reference of each method: J -> (d, w); the randomised ones take their draws.
DETERMINISTIC = {
    "IMTLG": formulas.imtl_g,
    "AlignedMTL": formulas.aligned_mtl,
    "UPGrad": formulas.upgrad,
    "DualProj": formulas.dualproj,
    "ConFIG": formulas.config,
    "CAGrad": lambda J: formulas.cagrad(J, 0.4),
    "NashMTL": lambda J: _weighted(J, formulas.nash_mtl_weights(J)),
    "FairGrad": lambda J: _weighted(J, formulas.fairgrad_weights(J, 1.0)),
}
RANDOMISED = ["PCGrad", "GradVac"]
GRAM_METHODS = [*DETERMINISTIC, *RANDOMISED]

# The weights of our Gram solvers, by method.
OURS = {
    "IMTLG": gram_weights.imtl_g_weights,
    "AlignedMTL": gram_weights.aligned_mtl_weights,
    "UPGrad": gram_weights.upgrad_weights,
    "DualProj": gram_weights.dualproj_weights,
    "ConFIG": gram_weights.config_weights,
    "CAGrad": lambda gram: gram_weights.cagrad_weights(gram, 0.4),
    "NashMTL": lambda gram: gram_weights.fair_weights(gram, 1.0),
    "FairGrad": lambda gram: gram_weights.fair_weights(gram, 1.0),
}

# Relative tolerance of an update against its float64 reference (``|d - d_ref| <= RTOL *
# max(||d_ref||, max_i ||g_i||)``): the closed forms and enumerations are exact to rounding
# (1e-13 seen); Nash-MTL / FairGrad stop at a residual of 1e-8 relative, and CAGrad's
# reference is an iterative solver to 1e-10.
RTOL = {"NashMTL": 1e-6, "FairGrad": 1e-6, "CAGrad": 1e-6}
DEFAULT_RTOL = 1e-9


def _weighted(J, w):
    return J.T @ w, w


def jacobian(kind, num_tasks, columns=20, seed=0):
    """``(K, P)`` float64 task gradients: ``random``, ``conflicting`` (pairs at obtuse angles)
    or ``scaled`` (norms from 1 to 100)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(num_tasks, columns, generator=gen, dtype=torch.float64)
    if kind == "conflicting":
        for i in range(1, num_tasks, 2):
            J[i] = -0.8 * J[i - 1] + 0.3 * J[i]
    elif kind == "scaled":
        J = J * torch.logspace(0, 2, num_tasks, dtype=torch.float64)[:, None]
    return J


def orders_from_seed(num_tasks, seed):
    """The task orders a randomised method draws after ``torch.manual_seed(seed)``: for each task
    the others sorted by one ``torch.rand(K, K)`` draw (the documented draw)."""
    torch.manual_seed(seed)
    keys = torch.rand(num_tasks, num_tasks)
    keys.fill_diagonal_(2.0)
    return keys.argsort(dim=1)[:, : num_tasks - 1].tolist()


def close(got, expected, scale, rtol):
    return bool((got - expected).abs().max() <= rtol * scale)


# --- the weights, from the Gram matrix --------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "conflicting", "scaled"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_update_is_the_papers_definition(method, num_tasks, kind):
    J = jacobian(kind, num_tasks, seed=num_tasks)
    expected, _ = DETERMINISTIC[method](J)
    got = J.T @ OURS[method](J @ J.T)
    scale = max(float(expected.norm()), float(J.norm(dim=1).max()))
    assert close(got, expected, scale, RTOL.get(method, DEFAULT_RTOL))


@pytest.mark.parametrize("kind", ["random", "conflicting", "scaled"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_pcgrad_is_the_papers_algorithm_in_the_drawn_order(num_tasks, kind):
    J = jacobian(kind, num_tasks, seed=num_tasks)
    orders = orders_from_seed(num_tasks, 11)
    expected, _ = formulas.pcgrad(J, orders)
    got = J.T @ gram_weights.pcgrad_weights(J @ J.T, torch.tensor(orders))
    assert close(got, expected, float(J.norm(dim=1).max()), DEFAULT_RTOL)


@pytest.mark.parametrize("kind", ["random", "conflicting", "scaled"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_gradvac_is_the_papers_algorithm_over_steps(num_tasks, kind):
    """Three steps from targets 0: the update and the targets' EMA follow Algorithm 1."""
    targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    expected_targets = targets.clone()
    for step in range(3):
        J = jacobian(kind, num_tasks, seed=10 * num_tasks + step)
        orders = orders_from_seed(num_tasks, step)
        expected, _, expected_targets = formulas.gradvac(J, orders, expected_targets, 0.5)
        weights, targets = gram_weights.gradvac_weights(J @ J.T, torch.tensor(orders), targets, 0.5)
        assert close(J.T @ weights, expected, float(J.norm(dim=1).max()), DEFAULT_RTOL)
        off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
        assert close(targets[off_diagonal], expected_targets[off_diagonal], 1.0, 1e-12)


def test_pcgrad_removes_each_conflict_in_the_order_it_used():
    """K = 2 in conflict: each projected gradient is orthogonal to the other task's gradient."""
    J = jacobian("conflicting", 2)
    assert float(J[0] @ J[1]) < 0
    weights = gram_weights.pcgrad_weights(J @ J.T, torch.tensor([[1], [0]]))
    first = J[0] - (J[0] @ J[1]) / (J[1] @ J[1]) * J[1]
    second = J[1] - (J[1] @ J[0]) / (J[0] @ J[0]) * J[0]
    assert torch.allclose(J.T @ weights, first + second, rtol=1e-12, atol=1e-12)
    assert abs(float(first @ J[1])) < 1e-12 and abs(float(second @ J[0])) < 1e-12


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_is_the_papers_rule(leak):
    J = jacobian("conflicting", 4, columns=200)
    uniform = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = formulas.graddrop(J, uniform, leak)
    assert torch.allclose(gram_weights.graddrop_update(J, uniform, leak), expected, atol=1e-15)


# --- backward on a model ----------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self, num_tasks):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(num_tasks))

    def losses(self, inputs, targets):
        features = self.trunk(inputs)
        outputs = [head(features)[:, 0] for head in self.heads]
        scales = torch.logspace(0, 1.5, len(outputs), dtype=inputs.dtype)
        return [
            (scale * (out - target)).square().mean()
            for scale, out, target in zip(scales, outputs, targets.T, strict=True)
        ]


def make_method(name, shared, num_tasks, **options):
    return getattr(fused_mtl, name)(shared, num_tasks, **options)


@pytest.mark.parametrize("per_task_gradients", ["batched", "loop"])
@pytest.mark.parametrize("method", [*GRAM_METHODS, "GradDrop"])
def test_backward_puts_the_update_in_the_trunk_and_weighted_gradients_in_the_heads(
    method, per_task_gradients
):
    num_tasks = 3
    torch.manual_seed(0)
    model = TwoHeads(num_tasks).double()
    inputs = torch.randn(16, 5, dtype=torch.float64)
    targets = torch.randn(16, num_tasks, dtype=torch.float64)
    shared = list(model.trunk.parameters())
    balancer = make_method(
        method, model.trunk.parameters(), num_tasks, per_task_gradients=per_task_gradients
    )

    losses = model.losses(inputs, targets)
    rows = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    heads = [list(head.parameters()) for head in model.heads]
    head_grads = [
        torch.autograd.grad(loss, params, retain_graph=True)
        for loss, params in zip(losses, heads, strict=True)
    ]

    if method == "GradDrop":
        torch.manual_seed(5)
        uniform = torch.cat([torch.rand(p.numel()) for p in shared]).double()
        expected = formulas.graddrop(J, uniform)
    elif method == "PCGrad":
        expected, _ = formulas.pcgrad(J, orders_from_seed(num_tasks, 5))
    elif method == "GradVac":
        zero = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        expected, _, _ = formulas.gradvac(J, orders_from_seed(num_tasks, 5), zero, 0.01)
    else:
        expected, _ = DETERMINISTIC[method](J)
    torch.manual_seed(5)
    balancer.backward(losses)

    got = torch.cat([p.grad.reshape(-1) for p in shared])
    scale = max(float(expected.norm()), float(J.norm(dim=1).max()))
    assert close(got, expected, scale, RTOL.get(method, DEFAULT_RTOL))
    weights = balancer.weights
    assert weights.shape == (num_tasks,) and torch.isfinite(weights).all()
    for weight, params, grads in zip(weights, heads, head_grads, strict=True):
        for param, grad in zip(params, grads, strict=True):
            assert torch.allclose(param.grad, weight * grad, rtol=1e-12, atol=1e-14)
    if method != "GradDrop":
        # The update is the weighted sum the weights say.
        assert close(got, J.T @ weights.double(), scale, 1e-12)


def test_graddrop_weights_are_ones_and_its_heads_get_plain_gradients():
    model = TwoHeads(2).double()
    graddrop = fused_mtl.GradDrop(model.trunk.parameters(), 2)
    inputs, targets = torch.randn(8, 5).double(), torch.randn(8, 2).double()
    graddrop.backward(model.losses(inputs, targets))
    assert torch.equal(graddrop.weights, torch.ones(2))


# --- properties over many random problems ----------------------------------------------------


def random_problems(count, sizes=(1, 2, 3, 4, 7, 11, 16, 32, 64)):
    """(K, J) pairs: K from ``sizes``, P = 2K + 5 columns, norms spread over 1 to 100, and one
    task in two conflicting with the one before."""
    for index in range(count):
        num_tasks = sizes[index % len(sizes)]
        kind = ("random", "conflicting", "scaled")[index % 3]
        yield num_tasks, jacobian(kind, num_tasks, columns=2 * num_tasks + 5, seed=100 + index)


@pytest.mark.parametrize("method", ["UPGrad", "DualProj"])
def test_dual_cone_updates_conflict_with_no_task(method):
    for num_tasks, J in random_problems(27):
        J = J * torch.logspace(0, 2, num_tasks, dtype=torch.float64)[:, None]
        d = J.T @ OURS[method](J @ J.T)
        products = J @ d
        assert float(products.min()) >= -1e-10 * float(J.norm(dim=1).max() * d.norm()), num_tasks


def assert_projection_optimality(J, preferences, weights):
    """The definition's optimality conditions of ``G^T w = π(G^T u)`` (the nearest point of the
    dual cone): ``G^T w - G^T u = G^T λ`` with ``λ = w - u >= 0``, ``<g_i, G^T w> >= 0``, and
    ``λ_i <g_i, G^T w> = 0``; each to rounding."""
    gram = J @ J.T
    scale = float(J.norm(dim=1).max()) ** 2 * float(weights.abs().max() + preferences.abs().max())
    for u, w in zip(preferences, weights, strict=True):
        excess = w - u
        products = gram @ w
        assert float(excess.min()) >= -1e-12 * float(w.abs().max() + u.abs().max())
        assert float(products.min()) >= -1e-10 * scale
        assert float((excess * products).abs().max()) <= 1e-10 * scale * float(w.abs().max())


def test_dual_cone_projections_are_optimal_on_both_paths():
    """K = 2 to 10 (enumeration) and 11 to 64 (interior point and polish), with norms 100x
    apart, conflicts, and a duplicated task (a singular Gram)."""
    for num_tasks, J in random_problems(27):
        J = J * torch.logspace(0, 2, num_tasks, dtype=torch.float64)[:, None]
        if num_tasks > 2:
            J[-1] = J[0]
        eye = torch.eye(num_tasks, dtype=torch.float64)
        mean = torch.full((1, num_tasks), 1 / num_tasks, dtype=torch.float64)
        for preferences in (eye, mean):
            weights = gram_weights.dual_cone_weights(J @ J.T, preferences)
            assert_projection_optimality(J, preferences, weights)


def test_imtl_g_projects_equally_on_every_unit_gradient():
    for num_tasks, J in random_problems(27):
        d = J.T @ gram_weights.imtl_g_weights(J @ J.T)
        projections = (J / J.norm(dim=1, keepdim=True)) @ d
        assert float(projections.max() - projections.min()) <= 1e-9 * float(d.norm()), num_tasks


def test_cagrad_update_is_on_its_ball_and_its_inner_problem_is_solved():
    for num_tasks, J in random_problems(27):
        for c in (0.0, 0.4, 0.9):
            weights = gram_weights.cagrad_weights(J @ J.T, c)
            d, mean = J.T @ weights, J.mean(dim=0)
            assert abs(float((d - mean).norm() - c * mean.norm())) <= 1e-9 * float(mean.norm())
            if c == 0 or num_tasks == 1:
                continue
            # w' = 1/K + r w / ||g_w||: the inner weights are w' - 1/K, up to their scale.
            inner = weights - 1 / num_tasks
            inner = inner / inner.sum()
            scale = float(J.norm(dim=1).max() * mean.norm())
            if num_tasks <= 7:
                ours = formulas.cagrad_inner_objective(J, c, inner)
                best = formulas.cagrad_inner_objective(J, c, formulas.cagrad_inner_weights(J, c))
                assert float(ours) <= float(best) + 1e-8 * scale, (num_tasks, c)
            # The Frank-Wolfe gap of the inner problem (its optimality on the simplex):
            # <w, grad F(w)> - min_i grad F(w)_i, with grad F = J g_0 + r J g_w / ||g_w||.
            g_w = J.T @ inner
            slopes = J @ mean + c * mean.norm() * (J @ g_w) / g_w.norm()
            gap = float(inner @ slopes - slopes.min())
            assert gap <= 1e-8 * scale, (num_tasks, c, gap / scale)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fair_weights_solve_their_condition(alpha):
    """Nash-MTL (alpha = 1) and FairGrad: M w = w^(-1/alpha), w > 0, to 1e-8 relative."""
    for num_tasks, J in random_problems(18, sizes=(1, 2, 3, 5, 8, 16, 32, 64)):
        weights = gram_weights.fair_weights(J @ J.T, alpha)
        assert (weights > 0).all()
        residual = formulas.fairgrad_condition(J, weights, alpha)
        assert float((residual.abs() / weights ** (-1 / alpha)).max()) <= 1e-8, num_tasks


def test_config_update_has_equal_cosines_with_every_task():
    for num_tasks, J in random_problems(27):
        d = J.T @ gram_weights.config_weights(J @ J.T)
        cosines = (J / J.norm(dim=1, keepdim=True)) @ d / d.norm()
        assert float(cosines.max() - cosines.min()) <= 1e-9, num_tasks
        assert float(cosines.min()) > 0


def test_aligned_mtl_aligns_to_equal_singular_values():
    """The reference's aligned matrix has every singular value equal (to the smallest of
    ``G``), and the update is the sum of its rows."""
    for num_tasks, J in random_problems(18, sizes=(1, 2, 3, 5, 8, 16)):
        gram = J @ J.T
        expected_matrix, _ = formulas.aligned_mtl_matrix(J)
        singular = torch.linalg.svdvals(expected_matrix)
        assert float(singular.max() - singular.min()) <= 1e-9 * float(singular.max())
        d = J.T @ gram_weights.aligned_mtl_weights(gram)
        assert close(
            d,
            expected_matrix.T @ torch.ones(num_tasks, dtype=torch.float64),
            float(J.norm(dim=1).max()),
            1e-9,
        )


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_weights_are_permutation_equivariant(method):
    for num_tasks, J in random_problems(9, sizes=(2, 3, 5, 8, 12)):
        permutation = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(num_tasks))
        gram = J @ J.T
        weights = OURS[method](gram)
        permuted = OURS[method](gram[permutation][:, permutation])
        scale = float(weights.abs().max())
        assert close(permuted, weights[permutation], scale, RTOL.get(method, 1e-8)), num_tasks


# How the update d = G^T w scales when every gradient is multiplied by s: d -> s^power d.
SCALE_POWER = {"NashMTL": -1.0, "FairGrad": -1.0}


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_scale_behaviour(method):
    """Gradients times s: the weights are unchanged (the update scales with s), except Nash-MTL
    and FairGrad at alpha = 1, whose weights scale as 1/s (the update is unchanged)."""
    J = jacobian("scaled", 4)
    gram = J @ J.T
    weights = OURS[method](gram)
    for s in (1e-3, 10.0):
        scaled = OURS[method](gram * s**2)
        expected = weights * s ** SCALE_POWER.get(method, 0.0)
        assert close(scaled, expected, float(expected.abs().max()), RTOL.get(method, 1e-9))


# K = 1: the update is the task's gradient g times the factor its definition gives.
ONE_TASK_FACTOR = {
    "CAGrad": lambda norm: 1 + 0.4,  # g_0 + c ||g_0|| g / ||g||
    "NashMTL": lambda norm: 1 / norm,  # ||g||^2 w = 1 / w
    "FairGrad": lambda norm: 1 / norm,  # ||g||^2 w = w^(-1/alpha), alpha = 1
}


@pytest.mark.parametrize("method", [*GRAM_METHODS, "GradDrop"])
def test_one_task(method):
    torch.manual_seed(0)
    model = TwoHeads(1).double()
    balancer = make_method(method, model.trunk.parameters(), 1)
    inputs, targets = torch.randn(8, 5).double(), torch.randn(8, 1).double()
    (loss,) = model.losses(inputs, targets)
    expected = torch.autograd.grad(loss, list(model.trunk.parameters()), retain_graph=True)
    norm = float(torch.cat([g.reshape(-1) for g in expected]).norm())
    factor = ONE_TASK_FACTOR.get(method, lambda norm: 1.0)(norm)
    balancer.backward([loss])
    for param, grad in zip(model.trunk.parameters(), expected, strict=True):
        assert torch.allclose(param.grad, factor * grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", [m for m in GRAM_METHODS if m != "GradVac"])
def test_finite_for_zero_and_duplicated_gradients(method):
    """A zero gradient, two equal ones: finite weights, and the dual-cone methods still
    conflict with no task."""
    J = jacobian("random", 4)
    J[1] = 0
    J[3] = J[2]
    if method == "PCGrad":
        weights = gram_weights.pcgrad_weights(J @ J.T, torch.tensor(orders_from_seed(4, 0)))
    else:
        weights = OURS[method](J @ J.T)
    assert torch.isfinite(weights).all()
    if method in ("UPGrad", "DualProj"):
        assert float((J @ (J.T @ weights)).min()) >= -1e-10


# --- hyper-parameters, state, errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "option", "value", "message"),
    [
        ("CAGrad", "c", -0.1, r"CAGrad: c must be a number in \[0.0, inf\], got -0.1"),
        ("FairGrad", "alpha", 0.0, r"FairGrad: alpha must be a number in \(0.0, inf\], got 0.0"),
        ("GradVac", "beta", 1.5, r"GradVac: beta must be a number in \[0.0, 1.0\], got 1.5"),
        ("GradDrop", "leak", True, r"GradDrop: leak must be a number in \[0.0, 1.0\], got True"),
    ],
)
def test_bad_hyper_parameters_are_refused_by_name(method, option, value, message):
    with pytest.raises(ValueError, match=message):
        make_method(method, nn.Linear(2, 2).parameters(), 2, **{option: value})


def test_gradvac_targets_round_trip_and_continue_bit_for_bit():
    torch.manual_seed(0)
    model = TwoHeads(3)
    gradvac = fused_mtl.GradVac(model.trunk.parameters(), 3, beta=0.5)
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)
    torch.manual_seed(1)
    gradvac.backward(model.losses(inputs, targets))
    assert gradvac.targets.abs().sum() > 0
    restored = fused_mtl.GradVac(model.trunk.parameters(), 3, beta=0.5)
    restored.load_state_dict(copy.deepcopy(gradvac.state_dict()))
    assert torch.equal(restored.targets, gradvac.targets)
    for balancer in (gradvac, restored):
        model.zero_grad()
        torch.manual_seed(2)
        balancer.backward(model.losses(inputs, targets))
    assert torch.equal(restored.targets, gradvac.targets)
    assert torch.equal(restored.weights, gradvac.weights)


def test_gradvac_refuses_a_checkpoint_with_a_target_outside_the_cosines():
    gradvac = fused_mtl.GradVac(nn.Linear(2, 2).parameters(), tasks=["depth", "seg"])
    state = gradvac.state_dict()
    state["targets"] = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"target cosine of tasks 'depth' and 'seg' is 3.0"):
        gradvac.load_state_dict(state)
    assert torch.equal(gradvac.targets, torch.zeros(2, 2))


@pytest.mark.parametrize("method", [*GRAM_METHODS, "GradDrop"])
def test_a_task_without_a_graph_is_named(method):
    trunk = nn.Linear(3, 2)
    balancer = make_method(method, trunk.parameters(), None, tasks=["depth", "seg"])
    out = trunk(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"task 'seg': its loss has no graph"):
        balancer({"depth": out.square().mean(), "seg": torch.tensor(1.0)})


def test_every_method_is_exported_and_in_the_methods_table():
    text = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    for name in [*GRAM_METHODS, "GradDrop"]:
        assert name in fused_mtl.__all__
        assert f"`{name}`" in text, name


@pytest.mark.parametrize("method", ["UPGrad", "CAGrad", "PCGrad"])
def test_gram_by_layer_gives_the_same_step(method):
    """The Gram built one layer at a time (``gram_by_layer=True``) is the same Gram: the same
    weights and gradients, to rounding."""
    grads = []
    for by_layer in (False, True):
        torch.manual_seed(0)
        model = TwoHeads(3).double()
        balancer = make_method(method, model.trunk, 3, gram_by_layer=by_layer)
        inputs, targets = torch.randn(16, 5).double(), torch.randn(16, 3).double()
        torch.manual_seed(1)
        balancer.backward(model.losses(inputs, targets))
        grads.append((balancer.weights.clone(), [p.grad.clone() for p in model.parameters()]))
    (weights_a, grads_a), (weights_b, grads_b) = grads
    assert torch.allclose(weights_a, weights_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


# --- hard problems: degenerate, ill-conditioned, float32 -------------------------------------


def test_cagrad_beyond_the_enumeration_finds_the_optimum_of_two_conflicting_groups():
    """K = 16 in two groups of nearly opposite tasks: the inner problem's Frank-Wolfe gap is
    at rounding level and the update improves every task, as exact CAGrad does here."""
    num_tasks, c = 16, 0.4
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3 * num_tasks, generator=gen, dtype=torch.float64)
    J = base + 0.05 * torch.randn(num_tasks, 3 * num_tasks, generator=gen, dtype=torch.float64)
    J[::2] *= -1
    weights = gram_weights.cagrad_weights(J @ J.T, c)
    inner = weights - 1 / num_tasks
    inner = inner / inner.sum()
    mean, g_w = J.mean(dim=0), J.T @ inner
    slopes = J @ mean + c * mean.norm() * (J @ g_w) / g_w.norm()
    scale = float(J.norm(dim=1).max() * mean.norm())
    assert float(inner @ slopes - slopes.min()) <= 1e-8 * scale
    assert float((J @ (J.T @ weights)).min()) > 0


def test_cagrad_ignores_a_task_without_gradient():
    """A zero gradient cannot be improved: its inner weight is 0 and every weight stays of the
    order of 1/K (before, K = 12 gave it a weight of 1e31)."""
    for num_tasks in (4, 12):
        J = jacobian("conflicting", num_tasks, columns=40)
        J[0] = 0
        weights = gram_weights.cagrad_weights(J @ J.T, 0.4)
        assert float(weights.abs().max()) < 1.0
        d, mean = J.T @ weights, J.mean(dim=0)
        assert abs(float((d - mean).norm() - 0.4 * mean.norm())) <= 1e-9 * float(mean.norm())


@pytest.mark.parametrize("method", ["UPGrad", "DualProj"])
def test_dual_cone_updates_never_conflict_on_degenerate_problems(method):
    """Antiparallel tasks and more tasks than dimensions (a singular Gram), K = 10 to 16."""
    for num_tasks, columns in ((10, 30), (12, 30), (16, 8)):
        J = jacobian("random", num_tasks, columns=columns, seed=num_tasks)
        J[1] = -J[0]
        d = J.T @ OURS[method](J @ J.T)
        scale = float(J.norm(dim=1).max()) * max(float(d.norm()), 1e-300)
        assert float((J @ d).min()) >= -1e-10 * scale, num_tasks


def test_spectral_methods_keep_their_update_for_dependent_float32_gradients():
    """A float32 model whose task 2 is 3 x task 0: the Gram's rounding leaves an eigenvalue
    near 1e-8 of the largest, which is not a direction (before, Aligned-MTL took it for
    sigma_min and its update collapsed by 4 000x)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 64), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(3))
    inputs, targets = torch.randn(64, 32), torch.randn(64, 3)
    features = trunk(inputs)
    losses = [((head(features)[:, 0] - targets[:, i]) ** 2).mean() for i, head in enumerate(heads)]
    losses[2] = 3 * losses[0]
    rows = [
        torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True) for loss in losses
    ]
    J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    exact_gram = J.double() @ J.double().T
    exact_gram[2] = 3 * exact_gram[0]
    exact_gram[:, 2] = 3 * exact_gram[:, 0]
    exact_gram[2, 2] = 9 * exact_gram[0, 0]
    for weights_of in (gram_weights.aligned_mtl_weights, gram_weights.config_weights):
        exact = J.double().T @ weights_of(exact_gram)
        rounded = J.double().T @ weights_of(J @ J.T).double()
        assert float((rounded - exact).norm()) <= 1e-3 * float(exact.norm())


def test_imtl_g_is_fair_to_the_tasks_that_have_a_gradient():
    J = jacobian("scaled", 4)
    J[1] = 0
    weights = gram_weights.imtl_g_weights(J @ J.T)
    assert float(weights[1]) == pytest.approx(0.25)
    assert float(weights.sum()) == pytest.approx(1.0)
    d = J.T @ weights
    present = [0, 2, 3]
    projections = (J[present] / J[present].norm(dim=1, keepdim=True)) @ d
    assert float(projections.max() - projections.min()) <= 1e-9 * float(d.norm())


def test_nash_weights_solve_their_condition_on_an_ill_conditioned_gram():
    """K = 64 gradients of rank 4 plus noise of 1e-3: 60 damped Newton steps left a residual
    of 8.8; with the line search the condition holds to 1e-5."""
    gen = torch.Generator().manual_seed(7)
    low_rank = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    J = low_rank @ torch.randn(4, 192, generator=gen, dtype=torch.float64)
    J = J + 1e-3 * torch.randn(64, 192, generator=gen, dtype=torch.float64)
    weights = gram_weights.fair_weights(J @ J.T, 1.0)
    assert float(((J @ J.T @ weights) * weights - 1).abs().max()) <= 1e-5


def test_gradvac_targets_stay_finite_after_a_non_finite_step():
    targets = torch.zeros(3, 3, dtype=torch.float64)
    J = jacobian("random", 3)
    bad = J.clone()
    bad[0, 0] = torch.inf
    orders = torch.tensor(orders_from_seed(3, 0))
    _, targets = gram_weights.gradvac_weights(bad @ bad.T, orders, targets, 0.5)
    assert torch.isfinite(targets).all()
    _, targets = gram_weights.gradvac_weights(J @ J.T, orders, targets, 0.5)
    assert torch.isfinite(targets).all() and targets.abs().sum() > 0


def test_graddrop_refuses_fsdp2_sharded_parameters(monkeypatch):
    """FSDP2 shards the shared parameters into DTensors (seen here through ``is_sharded``):
    GradDrop's per-coordinate update needs the whole gradients, and says so at construction."""
    import fused_mtl.balancer

    monkeypatch.setattr(fused_mtl.balancer, "is_sharded", lambda tensor: True)
    with pytest.raises(NotImplementedError, match="GradDrop: FSDP2-sharded shared parameters"):
        fused_mtl.GradDrop(nn.Linear(2, 2).parameters(), 2)
