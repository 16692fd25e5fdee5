"""Findings of the adversarial audit: each test fails on the code before its fix."""

import math

import formulas
import pytest
import torch

from fused_mtl import DWA, UncertaintyWeighting
from fused_mtl.compat import AutomaticWeightedLoss, MultiNoiseLoss

MANY = 65_536


def test_many_named_tasks_build_and_call_in_linear_time_with_short_errors():
    """65,536 task names: building a module and calling it with a dict used list look-ups
    (quadratic: 102 s and 84 s a call); a wrong count listed every name (a 513 KB message)."""
    names = [f"task{i}" for i in range(MANY)]
    uw = UncertaintyWeighting(tasks=names)
    losses = dict(zip(names, torch.rand(MANY).unbind(), strict=True))
    assert uw(losses).shape == ()
    with pytest.raises(ValueError) as error:
        uw(list(losses.values())[:-1])
    assert len(str(error.value)) < 300
    assert "'task0', 'task1'" in str(error.value) and "65528 more" in str(error.value)
    wrong = dict(losses)
    wrong["extra"] = wrong.pop("task5")
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['extra'\].*missing task\(s\)"
    ) as error:
        uw(wrong)
    assert len(str(error.value)) < 400
    with pytest.raises(ValueError, match="duplicate task names") as error:
        DWA(tasks=names + names[:100])
    assert len(str(error.value)) < 300
    with pytest.raises(ValueError, match="num_tasks=3 but 65536 task names") as error:
        DWA(3, tasks=names)
    assert len(str(error.value)) < 300


def test_a_task_whose_gradient_is_zero_at_the_first_step_is_not_rejected():
    """theta ** 2 at theta = 0: the gradient is exactly zero there, but the loss depends on the
    shared parameter; reachability is read from the graph, not from the values."""
    from fused_mtl import MGDA, GradNorm

    for make in (
        lambda theta: GradNorm([theta], 2, per_task_gradients="loop"),
        lambda theta: MGDA([theta], 2),
    ):
        for stacked in (False, True):
            theta = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
            balancer = make(theta)
            losses = [theta[0] ** 2 + 1, (theta[1] - 3) ** 2]
            total = balancer(torch.stack(losses) if stacked else losses)
            total.backward()
            assert torch.isfinite(total)


@pytest.mark.parametrize("mode", ["auto", "loop", "batched"])
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_a_task_loss_without_a_graph_is_named_on_every_call(mode, stacked):
    """A constant (or detached) task loss among graph losses: named on the first call and on
    later ones, whatever the mode (batched mode used to accept it silently, and MGDA gave it
    all the weight)."""
    from fused_mtl import MGDA

    trunk = torch.nn.Linear(3, 2)
    balancer = MGDA(trunk.parameters(), tasks=["a", "b"], per_task_gradients=mode)
    inputs = torch.randn(4, 3)

    def losses(constant_b):
        out = trunk(inputs)
        b = torch.tensor(0.5) if constant_b else out[:, 1].abs().mean()
        pair = [out[:, 0].square().mean(), b]
        return torch.stack(pair) if stacked else pair

    with pytest.raises(ValueError, match="MGDA: task 'b': its loss has no graph"):
        balancer(losses(True))
    balancer(losses(False)).backward()  # chooses the mode
    with pytest.raises(ValueError, match="MGDA: task 'b': its loss has no graph"):
        balancer(losses(True))


UNCERTAINTY_MODULES = {
    "uw": lambda backend: UncertaintyWeighting(2, backend=backend),
    "uw_regression": lambda backend: UncertaintyWeighting(
        2, task_types="regression", backend=backend
    ),
    "awl": lambda backend: AutomaticWeightedLoss(2, backend=backend),
    "multi_noise": lambda backend: MultiNoiseLoss(2, backend=backend),
}


def bounded_log_variance(module):
    """log sigma^2 of each task as the module's formula uses it: s, log p^2 or log eta^2."""
    parameter = next(module.parameters()).detach().double()
    if isinstance(module, UncertaintyWeighting):
        return parameter
    return torch.log(parameter**2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("module", list(UNCERTAINTY_MODULES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_negative_and_zero_losses_keep_every_number_finite(module, backend, optimizer):
    """A loss of -1 (an NLL) and one of 0 drive sigma^2 to 0 without limit: log_vars ran to
    -inf (SGD lr 0.1: by step 10; Adam: s = -47, total -4e20), then NaN. Bounded now: the
    variance stops at log sigma^2 = -20, and the total is the formula there, in float64."""
    torch.manual_seed(0)
    balancer = UNCERTAINTY_MODULES[module](backend)
    make = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = make(balancer.parameters(), lr=0.1)
    losses = torch.tensor([-1.0, 0.0])
    for _ in range(300):
        opt.zero_grad()
        total = balancer(losses)
        total.backward()
        grad = next(balancer.parameters()).grad
        assert bool(torch.isfinite(total)) and bool(torch.isfinite(grad).all())
        opt.step()
        assert bool(torch.isfinite(next(balancer.parameters())).all())
    log_variance = bounded_log_variance(balancer)
    if optimizer == "adam" and module.startswith("uw"):
        # Both reach the bound, and Adam's momentum carries s only a little past it (then its
        # gradient is 0). An SGD step near the bound is lr * e^20 |L| long and may land far
        # past it; p and eta cross zero, where their gradient spikes (1 / q^3).
        assert bool((log_variance < -19.9).all()), log_variance
        assert bool((log_variance > -25).all()), log_variance
    with torch.no_grad():
        total = float(balancer(losses))
    clamped = log_variance.clamp(-20, 20)
    if module == "uw":
        expected = formulas.log_variance(losses.double(), clamped).total
    elif module == "uw_regression":
        half = torch.full((2,), 0.5, dtype=torch.float64)
        expected = formulas.log_variance(losses.double(), clamped, half, half).total
    elif module == "awl":
        expected = formulas.liebel_koerner(losses.double(), torch.exp(clamped / 2)).total
    else:
        expected = formulas.dynamic_noise(losses.double(), torch.exp(clamped / 2)).total
    assert total == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["awl", "multi_noise"])
def test_the_magnitude_rule_of_the_sigma_and_eta_forms(form, backend):
    """p and eta enter through their magnitude (p^2, log |eta|): |q| is clamped to
    [e^-10, e^10] with its sign kept, and d/dq is dropped where a step moves |q| further out.
    Written out: d/d|q| of each task at the clamped value is [> 0 below: out -> 0, a step
    raises |q|: kept, > 0 above: kept, < 0 above (L = 1e12): out -> 0, inside: kept]."""
    params = torch.tensor([1e-6, -1e-6, 1e5, -1e5, 0.5])
    losses = torch.tensor([-1.0, 1.0, 1.0, 1e12, 2.0])
    balancer = UNCERTAINTY_MODULES[form](backend)
    balancer = type(balancer)(5, backend=backend)
    parameter = next(balancer.parameters())
    with torch.no_grad():
        parameter.copy_(params)
    total = balancer(losses)
    total.backward()
    sign = torch.where(params < 0, -1.0, 1.0).double()
    magnitude = params.double().abs().clamp(math.exp(-10), math.exp(10))
    formula = formulas.liebel_koerner if form == "awl" else formulas.dynamic_noise
    expected = formula(losses.double(), magnitude)
    keep = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    # Terms of +-2.4e8 cancel: the float32 total is exact relative to what it adds up.
    assert abs(float(total) - float(expected.total)) <= 1e-6 * float(expected.total_magnitude)
    torch.testing.assert_close(
        parameter.grad.double(), keep * sign * expected.grad_params, rtol=1e-5, atol=0
    )


def test_check_finite_names_the_task_with_a_negative_loss():
    uw = UncertaintyWeighting(tasks=["depth", "nll"], check_finite=True)
    before = uw.log_vars.detach().clone()
    with pytest.raises(ValueError, match=r"task 'nll': loss is -0.5 < 0; uncertainty weighting"):
        uw({"depth": torch.tensor(1.0), "nll": torch.tensor(-0.5)})
    assert torch.equal(uw.log_vars.detach(), before)
    with pytest.raises(FloatingPointError, match="task 'depth' = nan"):
        uw({"depth": torch.tensor(float("nan")), "nll": torch.tensor(-0.5)})
    # Zero is a valid loss (the bound handles a run of them).
    assert torch.isfinite(uw({"depth": torch.tensor(0.0), "nll": torch.tensor(0.0)}))
