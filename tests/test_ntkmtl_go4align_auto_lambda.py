"""NTKMTL (and its SR variant), GO4Align and Auto-Lambda against float64 references written
from their papers: NTK eigenvalues by ``eigvalsh`` of the kernels themselves, GO4Align's
grouping by trying every assignment, Auto-Lambda's derivative by autograd through the virtual
step and its weights by ``torch.optim.Adam``."""

import copy
import math

import gram_formulas
import method_formulas as formulas
import pytest
import torch
from test_gram_methods import jacobian
from test_loss_and_stochastic_methods import (
    NUM_TASKS,
    Net,
    assert_update,
    batch,
    positive_losses,
    sgd_step,
    train_steps,
)
from test_robust_and_smoothed_methods import model_step
from torch import nn
from torch.func import functional_call

import fused_mtl
from fused_mtl.reference import gram_weights

F64 = torch.float64


# --- NTKMTL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.5, 0.75])
@pytest.mark.parametrize("kind", ["random", "scaled"])
def test_ntkmtl_weights_are_the_papers(kind, exponent):
    for num_tasks in (1, 2, 5):
        J = jacobian(kind, num_tasks, seed=num_tasks)
        _, weights = gram_formulas.ntkmtl(J, exponent)
        got = gram_weights.ntk_weights((J @ J.T).diagonal(), exponent)
        torch.testing.assert_close(got, weights, rtol=1e-12, atol=0)


def test_ntkmtl_backward_puts_the_weighted_sum_in_the_trunk():
    trunk, J, heads, model, _ = model_step("NTKMTL")
    expected, weights = gram_formulas.ntkmtl(J)
    torch.testing.assert_close(trunk, expected, rtol=1e-12, atol=1e-14)
    for weight, head, grads in zip(weights, model.heads, heads, strict=True):
        for parameter, grad in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(parameter.grad, weight * grad, rtol=1e-12, atol=1e-14)
    # w_i^2 ||g_i||^2 is the same for every task: the kernels' eigenvalues, equalised.
    balanced = weights**2 * J.square().sum(dim=1)
    torch.testing.assert_close(balanced, balanced.mean().expand(3), rtol=1e-12, atol=0)


def test_ntkmtl_gives_a_task_without_gradient_weight_zero():
    gram = torch.diag(torch.tensor([4.0, 0.0, 1.0], dtype=F64))
    weights = gram_weights.ntk_weights(gram.diagonal())
    assert weights[1] == 0 and torch.isfinite(weights).all()


@pytest.mark.parametrize(("batch_size", "chunks"), [(12, 4), (10, 4), (12, 1), (5, 5)])
def test_ntkmtl_sr_eigenvalues_are_those_of_the_parts_kernels(batch_size, chunks):
    """The kernel of the parts' mean losses with respect to z, built part by part and
    diagonalised; the parts are torch.chunk's (uneven when the batch does not divide)."""
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 5).double(), nn.Linear(5, 3).double()
    inputs, targets = torch.randn(batch_size, 3, dtype=F64), torch.randn(batch_size, 3, dtype=F64)
    z = torch.tanh(trunk(inputs))

    def part_losses(rows):
        errors = heads(z[rows]) - targets[rows]
        return [errors[:, 0].square().mean(), errors[:, 1].abs().mean(), errors[:, 2].pow(4).mean()]

    parts = torch.arange(batch_size).chunk(chunks)
    kernels = []
    for task in range(3):
        rows = [
            torch.autograd.grad(part_losses(part)[task], z, retain_graph=True)[0].reshape(-1)
            for part in parts
        ]
        J = torch.stack(rows)
        kernels.append(J @ J.T)
    expected = gram_formulas.ntk_weights_from_kernels(kernels)
    ntkmtl = fused_mtl.NTKMTL(trunk.parameters(), 3, chunks=chunks)
    whole = part_losses(torch.arange(batch_size))
    total = ntkmtl(whole, features=z)
    torch.testing.assert_close(ntkmtl.weights, expected, rtol=1e-10, atol=0)
    total.backward()  # one ordinary backward of sum_i w_i L_i
    assert trunk.weight.grad is not None


# --- GO4Align -------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 3, 5])
@pytest.mark.parametrize("num_tasks", [1, 3, 5])
def test_go4align_weights_are_the_papers_groups_over_steps(num_tasks, groups):
    go4align = fused_mtl.GO4Align(num_tasks, groups=groups, beta=0.3)
    history = []
    for step in range(4):
        losses = positive_losses(num_tasks, 10 + step)
        history.append(losses)
        go4align(losses.clone().requires_grad_()).backward()
        expected = formulas.go4align(history, groups, 0.3)
        torch.testing.assert_close(go4align.weights, expected, rtol=1e-12, atol=1e-15)


def test_go4align_exact_groups_match_every_assignment_on_random_indicators():
    generator = torch.Generator().manual_seed(3)
    for _ in range(30):
        values = torch.rand(6, generator=generator, dtype=F64)
        got = fused_mtl.reference.loss_weights.group_centroids(values, 3)
        # The reference's grouping with q uniform and L = 1 / values: gamma is values / 6 times
        # a constant, so its centres are the values' centres times that constant.
        losses = 1 / values
        expected = formulas.go4align([losses], 3, 0.0)
        scale = float((losses.mean() / losses[0]) / 6 / values[0])
        torch.testing.assert_close(got * scale, expected, rtol=1e-12, atol=1e-15)


def test_go4align_state_round_trips_and_a_bad_checkpoint_is_refused():
    go4align = fused_mtl.GO4Align(tasks=["a", "b", "c"], beta=0.5)
    for step in range(3):
        go4align(positive_losses(3, step).requires_grad_()).backward()
    resumed = fused_mtl.GO4Align(tasks=["a", "b", "c"], beta=0.5)
    resumed.load_state_dict(go4align.state_dict())
    losses = positive_losses(3, 9)
    go4align(losses.clone().requires_grad_())
    resumed(losses.clone().requires_grad_())
    assert torch.equal(resumed.weights, go4align.weights)
    state = go4align.state_dict()
    state["alignment"] = torch.tensor([0.5, -0.5, 1.0], dtype=F64)
    before = go4align.alignment.clone()
    with pytest.raises(RuntimeError, match=r"alignment of task 'b' is -0\.5"):
        go4align.load_state_dict(state)
    assert torch.equal(go4align.alignment, before)


def test_go4align_stays_finite_for_a_zero_loss_and_a_long_run():
    go4align = fused_mtl.GO4Align(3, beta=50.0)
    for _ in range(200):
        go4align(torch.tensor([0.0, 3.0, 40.0]))
    assert torch.isfinite(go4align.weights).all() and torch.isfinite(go4align.alignment).all()
    assert float(go4align.alignment.sum()) == pytest.approx(1.0)


# --- Auto-Lambda ----------------------------------------------------------------------------


def lookahead_reference(net, weights, train, validation, virtual_lr):
    """dL_val(theta - alpha sum_i lambda_i g_i) / dlambda by autograd through the virtual
    step, theta' a function of lambda (torch.func.functional_call on the parameters)."""
    names = [name for name, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    losses = net.losses(train)
    rows = [torch.autograd.grad(loss, list(net.parameters()), retain_graph=True) for loss in losses]
    lam = weights.detach().clone().requires_grad_()
    moved = {
        name: p - virtual_lr * sum(lam[i] * rows[i][k] for i in range(NUM_TASKS))
        for k, (name, p) in enumerate(zip(names, params, strict=True))
    }
    # The validation losses of Net (its trunk, then its heads) at the moved parameters.
    trunk = {k.removeprefix("trunk."): v for k, v in moved.items() if k.startswith("trunk.")}
    heads = {k.removeprefix("heads."): v for k, v in moved.items() if k.startswith("heads.")}
    inputs, targets = validation
    errors = functional_call(net.heads, heads, (functional_call(net.trunk, trunk, (inputs,)),))
    errors = errors - targets
    val = errors[:, 0].square().mean() + errors[:, 1].abs().mean()
    val = val + torch.log(torch.cosh(errors[:, 2])).mean()
    (derivative,) = torch.autograd.grad(val, lam)
    return derivative


@pytest.mark.parametrize("with_validation", [True, False])
def test_auto_lambda_is_the_lookahead_meta_step_over_steps(with_validation):
    net = Net()
    auto_lambda = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS, lr=0.05, virtual_lr=0.3)
    reference = torch.full((NUM_TASKS,), 0.1, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.05)
    for step in range(4):
        train, validation = batch(step), batch(100 + step)
        if not with_validation:
            validation = train  # the training batch, at theta' = theta (first order)
        if with_validation:
            derivative = lookahead_reference(net, reference, train, validation, 0.3)
        else:
            losses = net.losses(train)
            rows = [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            loss, list(net.parameters()), retain_graph=True
                        )
                    ]
                )
                for loss in losses
            ]
            J = torch.stack(rows)
            derivative = -0.3 * (J @ J.sum(dim=0))
        reference.grad = derivative
        adam.step()
        losses = net.losses(train)
        expected = torch.autograd.grad(
            (reference.detach() * losses).sum(), list(net.parameters()), retain_graph=True
        )
        closure = (lambda data=validation: net.losses(data)) if with_validation else None
        auto_lambda.backward(losses, validation=closure)
        assert_update(auto_lambda.weights, reference.detach(), 1.0)
        got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        assert_update(got, torch.cat([g.reshape(-1) for g in expected]), 10.0)
        sgd_step(net)
    assert float((reference.detach() - 0.1).abs().max()) > 0.05  # the weights moved


def test_auto_lambda_leaves_the_parameters_and_the_training_graph_as_they_were():
    net = Net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    versions = [p._version for p in net.parameters()]
    auto_lambda = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS, virtual_lr=10.0)
    total = auto_lambda(net.losses(batch(0)), validation=lambda: net.losses(batch(1)))
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())
    assert [p._version for p in net.parameters()] == versions
    total.backward()  # the graph saved at theta: no in-place error, the gradient at theta
    expected = torch.autograd.grad(
        (auto_lambda.weights * net.losses(batch(0))).sum(), list(net.parameters())
    )
    for parameter, grad in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-12, atol=1e-15)


def test_auto_lambda_puts_the_parameters_back_when_the_closure_fails():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    auto_lambda = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS)

    def broken():
        raise RuntimeError("no validation data")

    with pytest.raises(RuntimeError, match="no validation data"):
        auto_lambda(net.losses(batch(0)), validation=broken)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert float(auto_lambda.weight_steps) == 0  # nothing advanced


def test_auto_lambda_state_continues_bit_for_bit():
    net = Net()
    balancer = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS, lr=0.01)
    train_steps(net, balancer, range(3))
    copy_net = copy.deepcopy(net)
    resumed = fused_mtl.AutoLambda(copy_net.parameters(), NUM_TASKS, lr=0.01)
    resumed.load_state_dict(balancer.state_dict())
    original = train_steps(net, balancer, range(3, 6))
    continued = train_steps(copy_net, resumed, range(3, 6))
    for (weights_a, params_a), (weights_b, params_b) in zip(original, continued, strict=True):
        assert torch.equal(weights_a, weights_b)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda p: fused_mtl.NTKMTL(p, 2, chunks=0), "NTKMTL: chunks must be a whole number >= 1"),
        (lambda p: fused_mtl.NTKMTL(p, 2, exponent=-1), r"NTKMTL: exponent must be a number"),
        (lambda p: fused_mtl.GO4Align(2, groups=0), "GO4Align: groups must be a whole number"),
        (lambda p: fused_mtl.GO4Align(2, beta=-1.0), r"GO4Align: beta must be a number in"),
        (lambda p: fused_mtl.AutoLambda(p, 2, lr=0.0), r"AutoLambda: lr must be a number in"),
        (lambda p: fused_mtl.AutoLambda(p, 2, virtual_lr=math.nan), "AutoLambda: virtual_lr"),
    ],
)
def test_bad_hyper_parameters_are_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build(nn.Linear(2, 2).parameters())


def test_auto_lambda_refuses_fsdp2_sharded_parameters(monkeypatch):
    import fused_mtl.balancer

    monkeypatch.setattr(fused_mtl.balancer, "is_sharded", lambda tensor: True)
    with pytest.raises(NotImplementedError, match="AutoLambda: FSDP2-sharded parameters"):
        fused_mtl.AutoLambda(nn.Linear(2, 2).parameters(), 2)


def test_ntkmtl_sr_needs_a_representation_with_a_graph():
    ntkmtl = fused_mtl.NTKMTL(nn.Linear(2, 2).parameters(), 2)
    losses = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)]
    with pytest.raises(ValueError, match="NTKMTL: features does not require grad"):
        ntkmtl(losses, features=torch.zeros(3, 2))


# --- edges the review found ---------------------------------------------------------------------


class SeparateHeads(nn.Module):
    """A trunk and one head module per task: each head is reached by its task only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(NUM_TASKS))

    def forward(self, data):
        inputs, targets = data
        features = self.trunk(inputs)
        return [
            (head(features)[:, 0] - targets[:, i]).square().mean()
            for i, head in enumerate(self.heads)
        ]

    losses = forward


def test_auto_lambda_moves_every_parameter_of_a_model_with_separate_heads():
    """Each head is moved by the virtual step with its own task's gradient only."""
    model = SeparateHeads().double()
    reference = torch.full((NUM_TASKS,), 0.1, dtype=F64, requires_grad=True)
    train, validation = batch(0), batch(1)
    rows = [
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        for loss in model.losses(train)
    ]
    moved = {}
    for k, (name, p) in enumerate(model.named_parameters()):
        step = sum(reference[i] * rows[i][k] for i in range(NUM_TASKS) if rows[i][k] is not None)
        moved[name] = p.detach() - 0.3 * step
    val_losses = functional_call(model, moved, (validation,), strict=True)
    (derivative,) = torch.autograd.grad(sum(val_losses), reference)
    auto_lambda = fused_mtl.AutoLambda(model.parameters(), NUM_TASKS, lr=0.05, virtual_lr=0.3)
    auto_lambda(model.losses(train), validation=lambda: model.losses(validation))
    expected = torch.optim.Adam([reference], lr=0.05)
    reference.grad = derivative
    expected.step()
    assert_update(auto_lambda.weights, reference.detach(), 1.0)


def test_auto_lambda_under_autocast_evaluates_the_closure_at_the_virtual_step():
    """With a large virtual step the derivative's sign depends on theta': the first Adam step
    (lr * sign) is the same under bfloat16 autocast as in float32."""
    results = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        auto_lambda = fused_mtl.AutoLambda(model.parameters(), 2, lr=0.01, virtual_lr=5.0)
        gen = torch.Generator().manual_seed(1)
        inputs, validation = torch.randn(32, 4, generator=gen), torch.randn(32, 4, generator=gen)

        def losses_of(x, model=model):
            out = model(x).float()
            return [out[:, 0].square().mean(), (out[:, 1] - 1).square().mean()]

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            auto_lambda(losses_of(inputs), validation=lambda v=validation: losses_of(v))
        results.append(auto_lambda.weights.clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


def test_auto_lambda_a_failed_closure_in_an_accumulated_step_is_not_counted():
    net = Net()
    auto_lambda = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    auto_lambda.step_with(optimizer)
    auto_lambda(net.losses(batch(0))).backward()

    def broken():
        raise RuntimeError("no validation data")

    with pytest.raises(RuntimeError, match="no validation data"):
        auto_lambda(net.losses(batch(1)), validation=broken)
    auto_lambda(net.losses(batch(1))).backward()
    assert auto_lambda._step_window.calls == 2


def test_auto_lambda_names_itself_for_a_closure_without_graph():
    net = Net()
    auto_lambda = fused_mtl.AutoLambda(net.parameters(), NUM_TASKS)

    def detached():
        with torch.no_grad():
            return net.losses(batch(1))

    with pytest.raises(ValueError, match="AutoLambda: the validation losses have no graph"):
        auto_lambda(net.losses(batch(0)), validation=detached)


def test_go4align_a_non_finite_loss_leaves_its_alignment_and_a_zero_one_is_refused():
    go4align = fused_mtl.GO4Align(tasks=["a", "b", "c"], beta=0.5)
    go4align(torch.tensor([1.0, 2.0, 3.0]))
    before = go4align.alignment.clone()
    go4align(torch.tensor([1.0, math.nan, 3.0]))
    assert torch.equal(go4align.alignment, before)
    go4align(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.isfinite(go4align.weights).all()
    state = go4align.state_dict()
    state["alignment"] = torch.zeros(3, dtype=F64)
    with pytest.raises(RuntimeError, match="alignment sums to 0"):
        go4align.load_state_dict(state)


def test_uw_so_tiny_temperatures_give_the_smallest_loss_the_weight():
    uw_so = fused_mtl.UWSO(2, temperature=1e-39)
    uw_so(torch.tensor([1.0, 2.0]))
    assert uw_so.weights.tolist() == [1.0, 0.0]
    uw_so = fused_mtl.UWSO(2, temperature=1e-30)
    uw_so(torch.tensor([1e-9, 2e-9]))
    assert uw_so.weights.tolist() == [1.0, 0.0]


def test_pbi_and_cosmos_of_huge_losses_are_finite():
    for balancer in (fused_mtl.PBI(2), fused_mtl.COSMOS(2)):
        total = balancer(torch.tensor([1e20, 3e20]))
        assert torch.isfinite(total) and torch.isfinite(balancer.weights).all()


def test_ntkmtl_weights_of_tiny_kernels_stay_finite():
    weights = gram_weights.ntk_weights(torch.tensor([1.0, 1e-39]))
    assert torch.isfinite(weights).all() and float(weights[1]) > 1e18
