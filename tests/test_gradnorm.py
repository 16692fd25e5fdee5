"""GradNorm against the paper's algorithm, written out in float64 in this file and formulas.py."""

import copy

import pytest
import torch
from formulas import gradnorm_weight_grad
from torch import nn

from fused_mtl import GradNorm, UncertaintyWeighting
from fused_mtl.ops.task_gradients import TaskGradients
from fused_mtl.synthetic import MultiTaskMLP, gradnorm_toy

TASKS = ["depth", "seg", "normals"]
ALPHA = 1.5


class SmallNet(nn.Module):
    """A fixed three-task network: a trunk whose last layer is shared, one head per task."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 2) for _ in TASKS)

    @property
    def shared(self):
        return self.trunk[2]

    def losses(self, inputs, targets):
        features = self.trunk(inputs)
        outputs = [head(features) for head in self.heads]
        return [
            (outputs[0] - targets[0]).square().mean(),
            (outputs[1] - targets[1]).abs().mean(),
            (outputs[2] * targets[2]).sum(dim=1).exp().mean(),
        ]


def make_net(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return SmallNet().to(device=device, dtype=dtype)


def make_batch(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    targets = [torch.randn(6, 2, generator=gen, dtype=torch.float64) for _ in TASKS]
    return inputs.to(device, dtype), [t.to(device, dtype) for t in targets]


def reference_step(net, inputs, targets, weights, initial_losses):
    """One GradNorm step in float64 from the algorithm: returns the total, the weights'
    gradient, every model parameter's gradient and the gaps G_i - T_i."""
    net = copy.deepcopy(net).double()
    inputs, targets = inputs.double().cpu(), [t.double().cpu() for t in targets]
    net = net.cpu()
    losses = torch.stack(net.losses(inputs, targets))
    shared = list(net.shared.parameters())
    per_task = []
    for loss in losses:  # g_i = dL_i / dW, one backward per task
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        per_task.append(torch.cat([g.flatten() for g in grads]))
    grad_norms = torch.stack(per_task).norm(dim=1)
    weight_grad, gaps = gradnorm_weight_grad(
        weights, grad_norms, losses.detach(), initial_losses, ALPHA
    )
    total = (weights * losses).sum()  # the weights are constants for the network
    model_grads = torch.autograd.grad(total, list(net.parameters()))
    return total.detach(), weight_grad, model_grads, gaps


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_step_matches_the_algorithm(backend, device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    weights = torch.tensor(
        [0.5, 1.7, 0.8], dtype=torch.float64
    )  # sum 3: renormalisation is a no-op
    initial = torch.tensor([2.0, 0.3, 1.5], dtype=torch.float64)
    total, weight_grad, model_grads, gaps = reference_step(net, inputs, targets, weights, initial)
    assert bool((gaps.abs() > 1e-3 * weights.abs().max()).all()), "the signs must be clear-cut"

    gradnorm = GradNorm(
        net.shared.parameters(), tasks=TASKS, initial_losses=initial.tolist(), backend=backend
    )
    with torch.no_grad():
        gradnorm.weights.copy_(weights.float())
    got = gradnorm.backward(net.losses(inputs, targets))

    assert not got.requires_grad
    torch.testing.assert_close(got.double().cpu(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        gradnorm.learned_weights.grad.double().cpu(), weight_grad, rtol=1e-5, atol=1e-6
    )
    for (name, parameter), expected in zip(net.named_parameters(), model_grads, strict=True):
        torch.testing.assert_close(
            parameter.grad.double().cpu(),
            expected,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )

    # Step 5: after the optimiser's update, the weights are rescaled to sum to K.
    torch.optim.SGD(gradnorm.parameters(), lr=0.1).step()
    updated = weights - 0.1 * weight_grad
    assert bool((updated > 0).all())
    gradnorm.renormalize_()
    torch.testing.assert_close(
        gradnorm.weights.double().cpu(), 3 * updated / updated.sum(), rtol=1e-6, atol=1e-7
    )


def test_renormalisation_happens_in_backward(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), 3)
    with torch.no_grad():
        gradnorm.weights.copy_(torch.tensor([2.0, -1.0, 4.0]))  # as if an optimiser stepped
    gradnorm.backward(net.losses(inputs, targets))
    # -1 is raised to the floor, then the sum is rescaled to K = 3 before the weights are used.
    expected = torch.tensor([2.0, 1e-6, 4.0], dtype=torch.float64)
    torch.testing.assert_close(
        gradnorm.weights.detach().double().cpu(), 3 * expected / expected.sum()
    )


def test_a_slow_task_gains_weight(device):
    """Two identical tasks, the first training slower (its loss ratio is 4x the other's): its
    target must be above the mean (r^+alpha), so its weight must grow. The inverted exponent
    r^-alpha, seen in circulation, would shrink it."""
    torch.manual_seed(3)
    layer = nn.Linear(4, 1).to(device)
    inputs, target = torch.randn(8, 4, device=device), torch.randn(8, 1, device=device)
    loss = (layer(inputs) - target).square().mean()
    value = loss.item()
    gradnorm = GradNorm(layer.parameters(), 2, initial_losses=[value / 2, value * 2])
    gradnorm.backward(loss, loss)
    assert gradnorm.learned_weights.grad[0] < 0 < gradnorm.learned_weights.grad[1]
    torch.optim.SGD(gradnorm.parameters(), lr=0.1).step()
    gradnorm.renormalize_()
    assert gradnorm.weights[0] > 1 > gradnorm.weights[1]


def test_no_second_order_term_reaches_the_model(device):
    """The model's gradients are exactly those of sum_i w_i L_i with the weights constant, as
    if GradNorm's own loss did not exist (it reaches only the weights)."""
    net = make_net(device)
    inputs, targets = make_batch(device)
    plain = copy.deepcopy(net)
    gradnorm = GradNorm(net.shared.parameters(), 3)
    gradnorm.backward(net.losses(inputs, targets))
    sum(plain.losses(inputs, targets)).backward()  # w = 1 on the first step
    for got, expected in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-7)


def test_gradients_accumulate(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), 3)
    gradnorm.backward(net.losses(inputs, targets))
    once = [p.grad.clone() for p in [*net.parameters(), gradnorm.learned_weights]]
    gradnorm.backward(net.losses(inputs, targets))
    for first, parameter in zip(once, [*net.parameters(), gradnorm.learned_weights], strict=True):
        torch.testing.assert_close(parameter.grad, 2 * first)


def test_calling_conventions_agree(device):
    inputs, targets = make_batch(device)
    results = []
    for convention in ["varargs", "list", "tensor", "dict"]:
        net = make_net(device)
        gradnorm = GradNorm(net.shared.parameters(), tasks=TASKS)
        losses = net.losses(inputs, targets)
        if convention == "varargs":
            total = gradnorm.backward(*losses)
        elif convention == "list":
            total = gradnorm.backward(losses)
        elif convention == "tensor":
            total = gradnorm.backward(torch.stack(losses))
        else:
            total = gradnorm.backward(dict(zip(reversed(TASKS), reversed(losses), strict=True)))
        results.append((total, gradnorm.learned_weights.grad, net.heads[1].weight.grad))
    for other in results[1:]:
        for got, expected in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_batched_mode_is_chosen_and_agrees_with_the_loop(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), 3)
    assert gradnorm.gradient_mode is None
    gradnorm.backward(net.losses(inputs, targets))
    assert gradnorm.gradient_mode == "batched", gradnorm.gradient_mode_reason
    first_norms = gradnorm.grad_norms.clone()
    gradnorm.backward(net.losses(inputs, targets))  # now through the batched path only
    torch.testing.assert_close(gradnorm.grad_norms, first_norms, rtol=1e-5, atol=1e-7)


class _SquareIntoBuffer(torch.autograd.Function):
    """x^2 whose backward writes into a preallocated buffer: it cannot be vmapped."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        buffer = torch.empty_like(x)
        buffer.copy_(2 * x * grad)
        return buffer


def test_loop_mode_when_the_model_cannot_be_batched(device):
    torch.manual_seed(4)
    layer, head_a, head_b = (
        nn.Linear(3, 4).to(device),
        nn.Linear(4, 1).to(device),
        nn.Linear(4, 1).to(device),
    )
    inputs = torch.randn(5, 3, device=device)

    def losses(square):
        features = square(layer(inputs))
        return [(head_a(features) - 1).square().mean(), head_b(features).square().mean()]

    gradnorm = GradNorm(layer.parameters(), 2)
    gradnorm.backward(losses(_SquareIntoBuffer.apply))
    assert gradnorm.gradient_mode == "loop"
    assert "batched backward failed" in gradnorm.gradient_mode_reason
    unbatchable = (
        gradnorm.grad_norms.clone(),
        gradnorm.learned_weights.grad.clone(),
        layer.weight.grad,
    )

    layer.zero_grad()
    plain = GradNorm(layer.parameters(), 2)
    plain.backward(losses(torch.square))
    assert plain.gradient_mode == "batched"
    torch.testing.assert_close(unbatchable[0], plain.grad_norms)
    torch.testing.assert_close(unbatchable[1], plain.learned_weights.grad)
    torch.testing.assert_close(unbatchable[2], layer.weight.grad)


class ConvNet(nn.Module):
    """A small convolutional trunk (two conv layers) and one linear head per task; ``square``
    is the activation between the trunk and the heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1), nn.Flatten()
        )
        self.heads = nn.ModuleList(nn.Linear(2 * 4 * 4, 1) for _ in range(2))

    def losses(self, inputs, square):
        features = square(self.trunk(inputs))
        return [(self.heads[0](features) - 1).square().mean(), self.heads[1](features).abs().mean()]


@pytest.mark.parametrize("method", ["GradNorm", "MGDA", "UPGrad"])
def test_a_later_call_that_cannot_be_batched_falls_back_to_the_loop(device, method):
    """The first call chooses the batched backward; a later step's graph holds a backward that
    vmap refuses (a branch taken from the second step on). With "auto" that call and the next
    ones give exactly the loop's gradients (the failed attempt consumed nothing); with
    "batched" the error names the fix."""
    import fused_mtl

    torch.manual_seed(6)
    inputs = torch.randn(4, 1, 6, 6, device=device)
    nets, balancers = [], []
    for requested in ("auto", "loop", "batched"):
        torch.manual_seed(7)
        net = ConvNet().to(device)
        nets.append(net)
        build = getattr(fused_mtl, method)
        balancers.append(build(net.trunk.parameters(), 2, per_task_gradients=requested))
    for net, balancer in zip(nets, balancers, strict=True):
        balancer.backward(net.losses(inputs, torch.square))
    assert balancers[0].gradient_mode == "batched"
    for _ in range(2):  # the fallback call, and the next one
        seen = []
        for net, balancer in zip(nets[:2], balancers[:2], strict=True):
            net.zero_grad()
            balancer.zero_grad()
            total = balancer.backward(net.losses(inputs, _SquareIntoBuffer.apply))
            grads = [p.grad for p in [*net.parameters(), *balancer.parameters()]]
            seen.append((total, balancer.weights.clone(), grads))
        assert balancers[0].gradient_mode == "loop"
        assert "batched backward failed at a later call" in balancers[0].gradient_mode_reason
        (total, weights, grads), (loop_total, loop_weights, loop_grads) = seen
        assert torch.equal(total, loop_total)
        assert torch.equal(weights, loop_weights)
        for got, expected in zip(grads, loop_grads, strict=True):
            assert torch.equal(got, expected)
    with pytest.raises(
        RuntimeError,
        match=r"per_task_gradients='batched' cannot be used with this model: the batched "
        r"backward failed at a later call: vmap.*per_task_gradients='loop'",
    ):
        balancers[2](nets[2].losses(inputs, _SquareIntoBuffer.apply))


def test_loop_mode_when_batched_gradients_disagree(device, monkeypatch):
    """Were the batched backward ever wrong, the first call's comparison keeps the loop."""
    net = make_net(device)
    inputs, targets = make_batch(device)

    def wrong(self, losses, separate_losses, parameters):
        return [2 * g for g in TaskGradients._loop(self, losses, None, parameters)]

    monkeypatch.setattr(TaskGradients, "_batched", wrong)
    gradnorm = GradNorm(net.shared.parameters(), 3)
    gradnorm.backward(net.losses(inputs, targets))
    assert gradnorm.gradient_mode == "loop"
    assert "disagrees" in gradnorm.gradient_mode_reason


def test_initial_losses_recorded_on_the_first_call_and_kept_in_the_state_dict(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), tasks=TASKS)
    assert torch.isnan(gradnorm.initial_losses).all()
    first = torch.stack(net.losses(inputs, targets)).detach()
    gradnorm.backward(net.losses(inputs, targets))
    torch.testing.assert_close(gradnorm.initial_losses, first)

    resumed = GradNorm(net.shared.parameters(), tasks=TASKS)
    resumed.load_state_dict(gradnorm.state_dict())
    assert set(gradnorm.state_dict()) == {"weights", "initial_losses", "_extra_state"}
    scaled = [loss * 0.5 for loss in net.losses(inputs, targets)]
    resumed.backward(scaled)
    # Not re-recorded: the loaded L_i(0) stays, and the halved losses give rates of 0.5.
    torch.testing.assert_close(resumed.initial_losses, first)


def test_gradnorm_resumes_bit_identically_from_a_checkpoint(device):
    inputs, targets = make_batch(device)

    def trainer(net):
        gradnorm = GradNorm(net.shared.parameters(), tasks=TASKS)
        optimizer = torch.optim.SGD([*net.parameters(), *gradnorm.parameters()], lr=0.05)
        return gradnorm, optimizer

    def run(net, gradnorm, optimizer, steps):
        history = []
        for _ in range(steps):
            optimizer.zero_grad()
            gradnorm.backward(net.losses(inputs, targets))
            optimizer.step()
            history.append(gradnorm.weights.detach().clone())
        return history

    net = make_net(device)
    whole = run(net, *trainer(net), steps=4)
    net = make_net(device)
    gradnorm, optimizer = trainer(net)
    run(net, gradnorm, optimizer, steps=2)
    checkpoint = copy.deepcopy([net.state_dict(), gradnorm.state_dict(), optimizer.state_dict()])
    resumed_net = make_net(device, seed=1)
    resumed, resumed_optimizer = trainer(resumed_net)
    for module, state in zip((resumed_net, resumed, resumed_optimizer), checkpoint, strict=True):
        module.load_state_dict(state)
    rest = run(resumed_net, resumed, resumed_optimizer, steps=2)
    for got, want in zip(rest, whole[2:], strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(whole[3], whole[1])


def test_uncertainty_weighting_has_the_same_interface(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    plain = copy.deepcopy(net)
    uw = UncertaintyWeighting(tasks=TASKS, init_log_var=[0.1, -0.2, 0.3]).to(device)
    uw_plain = copy.deepcopy(uw)
    total = uw.backward(net.losses(inputs, targets))
    expected = uw_plain(plain.losses(inputs, targets))
    expected.backward()
    assert not total.requires_grad
    torch.testing.assert_close(total, expected.detach())
    torch.testing.assert_close(uw.log_vars.grad, uw_plain.log_vars.grad)
    for got, want in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    torch.testing.assert_close(uw.weights, torch.exp(-uw.log_vars.detach()))


# --- bad input ------------------------------------------------------------------------------


def test_rejects_shared_parameters_that_are_not_usable():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"shared parameter 'weight' \(shape \(2, 2\)\) does not"):
        GradNorm(frozen, 2)
    with pytest.raises(ValueError, match="not a leaf tensor"):
        GradNorm([nn.Linear(2, 2).weight * 2], 2)
    with pytest.raises(ValueError, match="shared_parameters is empty"):
        GradNorm([], 2)
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="given twice"):
        GradNorm([layer.weight, layer.weight], 2)


def test_a_task_that_does_not_reach_the_shared_parameters_is_named(device):
    shared, side = nn.Linear(3, 2).to(device), nn.Linear(3, 1).to(device)
    inputs = torch.randn(4, 3, device=device)

    def losses():
        return {"reached": shared(inputs).square().mean(), "bypass": side(inputs).square().mean()}

    # Separate losses: found from the graph, naming the parameter.
    gradnorm = GradNorm(shared.parameters(), tasks=["reached", "bypass"])
    with pytest.raises(
        ValueError, match=r"task 'bypass': its loss does not reach the shared parameter '0' "
    ):
        gradnorm.backward(losses())
    # One stacked tensor: found from the graph below the stack.
    gradnorm = GradNorm(shared, tasks=["reached", "bypass"])
    with pytest.raises(ValueError, match=r"task 'bypass': its loss does not depend on the shared"):
        gradnorm.backward(torch.stack(list(losses().values())))


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (lambda ls: ls[:2], r"expected 3 \['depth', 'seg', 'normals'\] task losses, got 2"),
        (lambda ls: [ls[0], ls[1].expand(4), ls[2]], r"task 'seg': loss has shape \(4,\)"),
        (lambda ls: [x.detach() for x in ls], "no task loss requires grad"),
    ],
)
def test_bad_losses(losses, message, device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), tasks=TASKS)
    with pytest.raises(ValueError, match=message):
        gradnorm.backward(losses(net.losses(inputs, targets)))


def test_non_positive_initial_losses(device):
    net = make_net(device)
    with pytest.raises(ValueError, match=r"task 'seg': initial loss is 0.0"):
        GradNorm(net.shared.parameters(), tasks=TASKS, initial_losses=[1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="initial_losses must have 3 entries"):
        GradNorm(net.shared.parameters(), tasks=TASKS, initial_losses=[1.0, 2.0])
    inputs, targets = make_batch(device)
    gradnorm = GradNorm(net.shared.parameters(), tasks=TASKS)
    losses = net.losses(inputs, targets)
    with pytest.raises(ValueError, match=r"task 'normals': initial loss is -"):
        gradnorm.backward(losses[0], losses[1], -losses[2])


@pytest.mark.parametrize("alpha", [-0.5, float("nan"), float("inf"), "1.5", True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        GradNorm(nn.Linear(2, 2).parameters(), 2, alpha=alpha)


def test_calling_the_module_with_losses_without_a_graph_is_an_error():
    gradnorm = GradNorm(nn.Linear(2, 2).parameters(), 2)
    with pytest.raises(ValueError, match="GradNorm: no task loss requires grad"):
        gradnorm(torch.tensor(1.0), torch.tensor(2.0))
    assert gradnorm.gradient_mode is None and gradnorm.learned_weights.grad is None


# --- the GradNorm paper's toy ---------------------------------------------------------------


def training_rate_spread(method, seed, device, num_tasks=4, steps=300):
    """Train the toy with equal weights or GradNorm; return the std of L_i(t) / L_i(0)."""
    data = gradnorm_toy(num_tasks=num_tasks, num_samples=2000, seed=seed, device=device)
    torch.manual_seed(seed)
    model = MultiTaskMLP(num_tasks).to(device)
    groups = [{"params": model.parameters()}]
    if method == "gradnorm":
        gradnorm = GradNorm(model.last_shared_layer.parameters(), num_tasks)
        groups.append({"params": gradnorm.parameters(), "lr": 1e-2})
    optimizer = torch.optim.Adam(groups, lr=1e-3)

    def full_losses():
        with torch.no_grad():
            return (model(data.inputs) - data.targets).square().mean(dim=(1, 2))

    initial = full_losses()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, 2000, (100,), generator=gen).to(device)
        losses = (model(data.inputs[batch]) - data.targets[:, batch]).square().mean(dim=(1, 2))
        optimizer.zero_grad()
        if method == "gradnorm":
            gradnorm.backward(losses)
        else:
            losses.sum().backward()
        optimizer.step()
    return float((full_losses() / initial).std())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradnorm_brings_training_rates_together_on_the_toy(seed, device):
    equal = training_rate_spread("equal", seed, device)
    gradnorm = training_rate_spread("gradnorm", seed, device)
    assert gradnorm < 0.5 * equal, (gradnorm, equal)


def test_toy_data():
    data = gradnorm_toy(num_tasks=3, num_samples=50, seed=4)
    again = gradnorm_toy(num_tasks=3, num_samples=50, seed=4)
    assert torch.equal(data.targets, again.targets) and torch.equal(data.inputs, again.inputs)
    assert data.targets.shape == (3, 50, 100) and data.inputs.shape == (50, 250)
    # |f_i| <= sigma_i, and the tanh is mostly saturated at these scales.
    for task, sigma in enumerate([1.0, 10.0, 100.0]):
        assert data.targets[task].abs().max() <= sigma * (1 + 1e-6)
        assert data.targets[task].abs().mean() > 0.9 * sigma
    train, test = data.split(40)
    assert train.inputs.shape[0] == 40 and test.targets.shape == (3, 10, 100)
    with pytest.raises(ValueError, match="sigmas must have 3 entries"):
        gradnorm_toy(num_tasks=3, sigmas=[1.0, 2.0])


def test_requested_per_task_gradient_modes(device):
    net = make_net(device)
    inputs, targets = make_batch(device)
    results = {}
    for requested in ["loop", "batched"]:
        gradnorm = GradNorm(net.shared.parameters(), 3, per_task_gradients=requested)
        net.zero_grad()
        gradnorm.backward(net.losses(inputs, targets))
        assert gradnorm.gradient_mode == requested
        results[requested] = gradnorm.grad_norms
    torch.testing.assert_close(results["loop"], results["batched"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="per_task_gradients must be one of"):
        GradNorm(net.shared.parameters(), 3, per_task_gradients="vmap")


def test_requested_batched_mode_raises_when_it_cannot_be_used(device):
    layer, head = nn.Linear(3, 4).to(device), nn.Linear(4, 1).to(device)
    features = _SquareIntoBuffer.apply(layer(torch.randn(5, 3, device=device)))
    gradnorm = GradNorm(layer.parameters(), 2, per_task_gradients="batched")
    with pytest.raises(RuntimeError, match="per_task_gradients='batched' cannot be used"):
        gradnorm.backward(head(features).square().mean(), (head(features) - 1).square().mean())
