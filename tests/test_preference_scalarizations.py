"""PBI, COSMOS and UW-SO against float64 references written from their papers
(``method_formulas``): the total and its gradient in the losses, where the formulas have an
edge (the losses on the preference ray, all zero, tiny), and what they refuse."""

import math

import method_formulas as formulas
import pytest
import torch
from test_loss_and_stochastic_methods import check_total_and_gradient, positive_losses

import fused_mtl

F64 = torch.float64


@pytest.mark.parametrize("theta", [0.0, 5.0, 50.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 16])
def test_pbi_is_the_papers_value_and_its_gradient(theta, num_tasks):
    losses = positive_losses(num_tasks, 1)
    ideal = positive_losses(num_tasks, 2, low=0.0, high=0.05)
    preferences = positive_losses(num_tasks, 3, low=0.2, high=2.0)
    pbi = fused_mtl.PBI(
        num_tasks, theta=theta, ideal_point=ideal.tolist(), preferences=preferences.tolist()
    )
    objective = formulas.penalty_boundary_intersection(theta, preferences, ideal)
    check_total_and_gradient(pbi, losses, objective)


def test_pbi_on_its_ray_weights_along_the_ray():
    """On the ray the distance has no gradient: the weights are the unit preferences, not the
    direction of r - d_1 u's rounding error (which theta = 5 would multiply)."""
    for dtype in (torch.float32, F64):
        pbi = fused_mtl.PBI(3, preferences=[1.0, 2.0, 3.0])
        total = pbi(torch.tensor([0.7, 1.4, 2.1], dtype=dtype))
        unit = torch.tensor([1.0, 2.0, 3.0], dtype=F64) / math.sqrt(14)
        torch.testing.assert_close(pbi.weights.double(), unit, rtol=1e-6, atol=0)
        assert abs(float(total) - 0.7 * math.sqrt(14)) < 1e-5
    one = fused_mtl.PBI(1, theta=5.0)
    assert one(torch.tensor([2.5])).item() == 2.5 and one.weights.tolist() == [1.0]


@pytest.mark.parametrize("mu", [0.0, 1.0, 8.0])
@pytest.mark.parametrize("num_tasks", [1, 3, 16])
def test_cosmos_is_the_papers_value_and_its_gradient(mu, num_tasks):
    losses = positive_losses(num_tasks, 4)
    preferences = positive_losses(num_tasks, 5, low=0.2, high=2.0)
    cosmos = fused_mtl.COSMOS(num_tasks, mu=mu, preferences=preferences.tolist())
    check_total_and_gradient(cosmos, losses, formulas.cosmos(mu, preferences))


def test_cosmos_of_zero_losses_is_finite():
    cosmos = fused_mtl.COSMOS(3, mu=2.0)
    losses = torch.zeros(3, requires_grad=True)
    total = cosmos(losses)
    total.backward()
    assert float(total) == 0.0
    assert torch.isfinite(losses.grad).all() and torch.equal(
        cosmos.weights, torch.full((3,), 1 / 3)
    )


@pytest.mark.parametrize("temperature", [0.2, 1.0, 10.0])
@pytest.mark.parametrize("num_tasks", [1, 2, 7])
def test_uw_so_weights_are_the_softmax_of_the_inverse_losses(temperature, num_tasks):
    losses = positive_losses(num_tasks, 6, low=0.3, high=3.0)
    weights = formulas.uw_so_weights(losses, temperature)
    uw_so = fused_mtl.UWSO(num_tasks, temperature=temperature)
    check_total_and_gradient(uw_so, losses, lambda L: (weights * L).sum())
    assert abs(float(uw_so.weights.sum()) - 1) < 1e-12


def test_uw_so_stays_finite_for_zero_and_tiny_losses_and_checks_when_asked():
    uw_so = fused_mtl.UWSO(3, temperature=1e-3)
    total = uw_so(torch.tensor([0.0, 1e-30, 1.0]))
    assert torch.isfinite(total) and torch.isfinite(uw_so.weights).all()
    assert uw_so.weights.tolist() == [1.0, 0.0, 0.0]  # the smallest loss takes the weight
    checked = fused_mtl.UWSO(tasks=["depth", "seg"], check_finite=True)
    with pytest.raises(ValueError, match="task 'seg'"):
        checked(torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fused_mtl.PBI(2, theta=-1.0), r"PBI: theta must be a number in \[0.0, inf\]"),
        (lambda: fused_mtl.PBI(2, theta=math.inf), r"PBI: theta must be a finite number"),
        (lambda: fused_mtl.PBI(tasks=["a", "b"], preferences=[1, 0]), "PBI: task 'b': preferences"),
        (lambda: fused_mtl.PBI(2, ideal_point=[0.0, math.nan]), "PBI: task 1: ideal_point"),
        (lambda: fused_mtl.COSMOS(2, mu=-0.5), r"COSMOS: mu must be a number in \[0.0, inf\]"),
        (lambda: fused_mtl.COSMOS(2, preferences=[1.0]), "COSMOS: preferences must be one number"),
        (
            lambda: fused_mtl.UWSO(2, temperature=0.0),
            r"UWSO: temperature must be a number in \(0.0",
        ),
        (lambda: fused_mtl.UWSO(2, temperature=math.inf), "UWSO: temperature must be a finite"),
    ],
)
def test_bad_hyper_parameters_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()
