"""The loss-level methods (FAMO, RLW, GLS, IMTL-L, STCH) and the stochastic gradient methods
(MoCo, SDMGrad, MoDo, ExcessMTL) against float64 references from each paper's equations
(``method_formulas``): totals and their gradients, updates over several steps on a float64
model, state_dict round trips that continue bit for bit, and the errors."""

import copy
import math
import re

import method_formulas as formulas
import pytest
import torch
from torch import nn

import fused_mtl

F64 = torch.float64
RTOL = 1e-12


def positive_losses(num_tasks, seed, low=0.05, high=3.0):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(num_tasks, generator=gen, dtype=F64)


def check_total_and_gradient(balancer, losses, objective):
    """The balancer's total and dtotal/dL (by its own backward) against the reference's."""
    point = losses.clone().requires_grad_()
    total = balancer(point)
    total.backward()
    value, gradient = formulas.value_and_gradient(objective, losses)
    torch.testing.assert_close(total.detach(), value, rtol=RTOL, atol=0)
    torch.testing.assert_close(point.grad, gradient, rtol=RTOL, atol=1e-300)
    torch.testing.assert_close(balancer.weights, gradient, rtol=RTOL, atol=1e-300)


# --- the loss-level methods: the paper's value and its gradient -----------------------------


@pytest.mark.parametrize("num_tasks", [1, 2, 5, 64])
@pytest.mark.parametrize("seed", range(3))
def test_geometric_mean_is_the_product_root_and_its_gradient(num_tasks, seed):
    losses = positive_losses(num_tasks, seed)
    check_total_and_gradient(fused_mtl.GeometricMean(num_tasks), losses, formulas.geometric_mean)


def test_geometric_mean_is_invariant_to_each_losss_scale_up_to_its_root():
    losses = positive_losses(4, 0)
    gls = fused_mtl.GeometricMean(4)
    scaled = losses * torch.tensor([1.0, 10.0, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(gls(scaled), gls(losses) * 10.0 ** (1 / 4), rtol=RTOL, atol=0)


def test_geometric_mean_of_a_zero_loss_is_finite():
    gls = fused_mtl.GeometricMean(3)
    losses = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    total = gls(losses)
    total.backward()
    assert total.item() == 0.0
    assert torch.isfinite(losses.grad).all() and torch.isfinite(gls.weights).all()


@pytest.mark.parametrize("mu", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("num_tasks", [1, 3, 16])
def test_stch_is_the_smooth_tchebycheff_value_and_its_gradient(mu, num_tasks):
    losses = positive_losses(num_tasks, 1)
    ideal = positive_losses(num_tasks, 2, low=0.0, high=0.05)
    preferences = positive_losses(num_tasks, 3, low=0.2, high=2.0)
    stch = fused_mtl.STCH(
        num_tasks, mu=mu, ideal_point=ideal.tolist(), preferences=preferences.tolist()
    )
    check_total_and_gradient(stch, losses, formulas.smooth_tchebycheff(mu, ideal, preferences))


def test_stch_approaches_the_worst_task_and_stays_finite():
    losses = torch.tensor([2.0, 0.5, 1.0], dtype=F64)
    assert abs(fused_mtl.STCH(3, mu=1e-3)(losses).item() - 2.0) < 1e-9
    huge = torch.tensor([1e30, 1.0, 3e30])
    stch = fused_mtl.STCH(3, mu=1e-3)
    assert torch.isfinite(stch(huge)) and torch.isfinite(stch.weights).all()
    assert stch.weights.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("seed", range(3))
def test_imtl_l_is_the_scaled_losses_minus_the_scales(seed):
    num_tasks = 4
    losses = positive_losses(num_tasks, seed)
    scales = positive_losses(num_tasks, seed + 10, low=-2.0, high=2.0)
    imtl = fused_mtl.IMTLL(num_tasks, backend="torch").double()
    with torch.no_grad():
        imtl.loss_scale.copy_(scales)
    point = losses.clone().requires_grad_()
    total = imtl(point)
    total.backward()
    s = scales.clone().requires_grad_()
    L = losses.clone().requires_grad_()
    expected = formulas.imtl_l(L, s)
    expected.backward()
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(point.grad, L.grad, rtol=RTOL, atol=0)
    torch.testing.assert_close(imtl.loss_scale.grad, s.grad, rtol=RTOL, atol=1e-15)
    torch.testing.assert_close(imtl.weights, torch.exp(scales), rtol=RTOL, atol=0)


def test_imtl_l_reaches_scaled_losses_of_one():
    """The stationary point of e^s L - s is e^s L = 1 for every task."""
    imtl = fused_mtl.IMTLL(3)
    optimizer = torch.optim.SGD(imtl.parameters(), lr=0.1)
    losses = torch.tensor([4.0, 0.5, 0.05])
    for _ in range(3000):
        optimizer.zero_grad()
        imtl(losses).backward()
        optimizer.step()
    torch.testing.assert_close(imtl.weights * losses, torch.ones(3), rtol=1e-4, atol=0)


@pytest.mark.parametrize("num_tasks", [1, 2, 7])
def test_random_weighting_is_the_softmax_of_the_seeded_normal_draw(num_tasks):
    losses = positive_losses(num_tasks, 0)
    rlw = fused_mtl.RandomWeighting(num_tasks)
    for seed in range(3):
        torch.manual_seed(seed)
        draw = torch.randn(num_tasks)
        point = losses.clone().requires_grad_()
        torch.manual_seed(seed)
        total = rlw(point)
        total.backward()
        weights = formulas.random_weights(draw)
        torch.testing.assert_close(rlw.weights.to(F64), weights, rtol=1e-6, atol=0)
        torch.testing.assert_close(point.grad, rlw.weights.to(F64), rtol=0, atol=0)
        torch.testing.assert_close(total.detach(), (rlw.weights.to(F64) * losses).sum())
    rlw.eval()
    before = rlw.weights.clone()
    state = torch.get_rng_state()
    rlw(losses)
    assert torch.equal(rlw.weights, before) and torch.equal(torch.get_rng_state(), state)


# --- FAMO -----------------------------------------------------------------------------------


def famo_losses(num_steps, num_tasks=3, seed=0):
    """A run's losses before and after each step: falling at different rates, with noise."""
    gen = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.02, 0.2, num_tasks, dtype=F64)
    levels = [
        torch.exp(-rates * t) * (1 + 0.05 * torch.rand(num_tasks, generator=gen, dtype=F64))
        for t in range(num_steps + 1)
    ]
    return [(levels[t], levels[t + 1]) for t in range(num_steps)]


@pytest.mark.parametrize("min_losses", [0.0, 0.01])
def test_famo_is_the_papers_loop_with_explicit_updates(min_losses):
    steps = famo_losses(8)
    famo = fused_mtl.FAMO(3, lr=0.1, gamma=1e-2, min_losses=min_losses).double()
    reference = formulas.famo(steps, 0.1, 1e-2, torch.full((3,), min_losses, dtype=F64))
    for (before, after), (weights, shares) in zip(steps, reference, strict=True):
        point = before.clone().requires_grad_()
        famo(point).backward()
        torch.testing.assert_close(point.grad, weights, rtol=1e-10, atol=0)
        torch.testing.assert_close(famo.weights, weights, rtol=1e-10, atol=0)
        famo.update(after)
        torch.testing.assert_close(famo.task_shares, shares, rtol=1e-10, atol=0)


def test_famo_without_update_compares_with_the_next_calls_losses():
    steps = famo_losses(8)
    # Each call's "after" is the next call's losses.
    chained = [(before, steps[t + 1][0]) for t, (before, _) in enumerate(steps[:-1])]
    reference = formulas.famo(chained, 0.1, 1e-3, torch.zeros(3, dtype=F64))
    famo = fused_mtl.FAMO(3, lr=0.1).double()
    for t, (before, _) in enumerate(steps):
        famo(before)
        if t > 0:
            torch.testing.assert_close(
                famo.weights,
                formulas.famo(
                    [*chained[:t], (before, before)], 0.1, 1e-3, torch.zeros(3, dtype=F64)
                )[-1][0],
                rtol=1e-10,
                atol=0,
            )
            torch.testing.assert_close(famo.task_shares, reference[t - 1][1], rtol=1e-10, atol=0)


def test_famo_moves_its_weights_toward_the_task_that_improves_slowest():
    """The paper's claim: FAMO equalises the rates at which the log-losses fall, so the task
    whose loss falls slowest gains weight, and the fastest loses it."""
    famo = fused_mtl.FAMO(3)
    losses = torch.ones(3)
    rates = torch.tensor([0.9, 0.99, 0.999])  # per step: fast, slow, slowest
    first = None
    for _ in range(200):
        famo(losses)
        losses = losses * rates
        famo.update(losses)
        first = famo.task_shares.clone() if first is None else first
    shares = famo.task_shares
    assert shares[2] > shares[1] > shares[0]
    assert shares[2] > first[2] and shares[0] < first[0]


def test_famo_update_without_a_call_is_refused_and_changes_nothing():
    famo = fused_mtl.FAMO(tasks=["a", "b"])
    before = copy.deepcopy(famo.state_dict())
    with pytest.raises(
        RuntimeError, match=re.escape("FAMO.update: no training call awaits an update")
    ):
        famo.update(torch.tensor([1.0, 1.0]))
    famo(torch.tensor([1.0, 2.0]))
    famo.update(torch.tensor([0.5, 2.0]))
    with pytest.raises(RuntimeError, match=re.escape("FAMO.update")):
        famo.update(torch.tensor([0.5, 2.0]))
    assert not torch.equal(famo.logits, before["logits"])


def test_famo_and_geometric_mean_check_their_domain_when_asked():
    with pytest.raises(ValueError, match=re.escape("GeometricMean: task 'b': loss is 0.0")):
        fused_mtl.GeometricMean(tasks=["a", "b"], check_finite=True)(torch.tensor([1.0, 0.0]))
    famo = fused_mtl.FAMO(tasks=["a", "b"], min_losses=[0.0, 0.5], check_finite=True)
    with pytest.raises(ValueError, match=re.escape("FAMO: task 'b': loss is 0.25")):
        famo(torch.tensor([1.0, 0.25]))
    assert not famo._pending
    with pytest.raises(FloatingPointError, match="task 'a'"):
        famo(torch.tensor([math.nan, 1.0]))


# --- the stochastic gradient methods on a float64 model --------------------------------------

NUM_TASKS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.heads = nn.Linear(6, NUM_TASKS)
        self.double()

    def losses(self, batch):
        inputs, targets = batch
        errors = self.heads(self.trunk(inputs)) - targets
        # Three kinds of loss, so that the tasks' gradients differ in scale and direction.
        return torch.stack(
            [
                errors[:, 0].square().mean(),
                errors[:, 1].abs().mean(),
                torch.log(torch.cosh(errors[:, 2])).mean(),
            ]
        )


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(12, 3, generator=gen, dtype=F64),
        torch.randn(12, NUM_TASKS, generator=gen, dtype=F64),
    )


def jacobian(net, data):
    """The K x P gradients of the trunk, one autograd call per task."""
    losses = net.losses(data)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(net.trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def head_gradients(net, data, weights):
    total = (weights.to(F64) * net.losses(data)).sum()
    return torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(total, list(net.heads.parameters()))]
    )


def trained_gradients(net):
    trunk = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    heads = torch.cat([p.grad.reshape(-1) for p in net.heads.parameters()])
    return trunk, heads


def sgd_step(net):
    with torch.no_grad():
        for parameter in net.parameters():
            parameter -= 0.1 * parameter.grad
            parameter.grad = None


def assert_update(got, expected, scale):
    error = float((got - expected).abs().max())
    assert error <= 1e-10 * max(float(scale), 1.0), f"off by {error:.3e}"


@pytest.mark.parametrize("gradients", ["batched", "loop"])
def test_moco_is_the_papers_algorithm_over_steps(gradients):
    net = Net()
    moco = fused_mtl.MoCo(net.trunk.parameters(), NUM_TASKS, rho=0.1, per_task_gradients=gradients)
    seen = []
    for step in range(4):
        data = batch(step)
        seen.append(jacobian(net, data))
        update, lam = formulas.moco(seen, rho=0.1)[-1]
        moco.backward(net.losses(data))
        trunk, heads = trained_gradients(net)
        assert_update(trunk, update, update.abs().max())
        assert_update(moco.weights, lam, 1.0)
        assert_update(heads, head_gradients(net, data, lam), 1.0)
        sgd_step(net)


@pytest.mark.parametrize("separate_batches", [True, False])
@pytest.mark.parametrize("method", ["SDMGrad", "MoDo"])
def test_double_sampling_methods_are_the_papers_updates_over_steps(method, separate_batches):
    net = Net()
    options = {"gamma": 0.5} if method == "MoDo" else {}
    balancer = getattr(fused_mtl, method)(net.trunk.parameters(), NUM_TASKS, **options)
    state = torch.full((NUM_TASKS,), 1 / NUM_TASKS, dtype=F64)
    for step in range(4):
        data = batch(3 * step)
        extra = (batch(3 * step + 1), batch(3 * step + 2)) if separate_batches else (data, data)
        J, J_a, J_b = jacobian(net, data), jacobian(net, extra[0]), jacobian(net, extra[1])
        if method == "SDMGrad":
            update, weights, state = formulas.sdmgrad(J, J_a, J_b, state)
        else:
            update, state = formulas.modo(J, J_a, J_b, state, 0.5, 0.1)
            weights = state
        if separate_batches:
            weight_losses = tuple(net.losses(b) for b in extra)
            balancer.backward(net.losses(data), weight_losses=weight_losses)
        else:
            balancer.backward(net.losses(data))
        trunk, heads = trained_gradients(net)
        assert_update(trunk, update, J.abs().max())
        assert_update(balancer.weights, weights, 1.0)
        assert_update(heads, head_gradients(net, data, weights), 1.0)
        sgd_step(net)
    assert not torch.allclose(state, torch.full_like(state, 1 / NUM_TASKS))  # it moved


def test_excess_mtl_is_the_papers_weighting_over_steps():
    net = Net()
    excess = fused_mtl.ExcessMTL(net.trunk.parameters(), NUM_TASKS, step_size=0.5)
    seen = []
    for step in range(5):
        data = batch(step)
        seen.append(jacobian(net, data))
        weights = formulas.excess_mtl(seen, 0.5)[-1]
        excess.backward(net.losses(data))
        trunk, heads = trained_gradients(net)
        J = seen[-1]
        assert_update(trunk, J.T @ weights, J.abs().max() * NUM_TASKS)
        assert_update(excess.weights, weights, NUM_TASKS)
        assert_update(heads, head_gradients(net, data, weights), NUM_TASKS)
        sgd_step(net)
    assert not torch.allclose(weights, torch.ones_like(weights))


# --- checkpoints ----------------------------------------------------------------------------

STATEFUL = {
    "FAMO": lambda net: fused_mtl.FAMO(NUM_TASKS, lr=0.1),
    "IMTLL": lambda net: fused_mtl.IMTLL(NUM_TASKS),
    "MoCo": lambda net: fused_mtl.MoCo(net.trunk.parameters(), NUM_TASKS),
    "SDMGrad": lambda net: fused_mtl.SDMGrad(net.trunk.parameters(), NUM_TASKS),
    "MoDo": lambda net: fused_mtl.MoDo(net.trunk.parameters(), NUM_TASKS, gamma=0.5),
    "ExcessMTL": lambda net: fused_mtl.ExcessMTL(net.trunk.parameters(), NUM_TASKS),
}


def train_steps(net, balancer, steps):
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.1)
    seen = []
    for step in steps:
        optimizer.zero_grad()
        balancer(net.losses(batch(step))).backward()
        optimizer.step()
        seen.append((balancer.weights.clone(), [p.detach().clone() for p in net.parameters()]))
    return seen


@pytest.mark.parametrize("method", list(STATEFUL))
def test_state_dict_round_trip_continues_bit_for_bit(method):
    net = Net()
    balancer = STATEFUL[method](net)
    train_steps(net, balancer, range(3))
    copy_net = copy.deepcopy(net)
    resumed = STATEFUL[method](copy_net)
    resumed.load_state_dict(balancer.state_dict())
    # The weights an eval-mode total uses (a loaded buffer keeps its own dtype: FAMO's float32
    # buffer holds the float64 weights of float64 losses rounded, as load_state_dict copies).
    assert torch.equal(resumed.weights, balancer.weights.to(resumed.weights.dtype))
    original = train_steps(net, balancer, range(3, 6))
    continued = train_steps(copy_net, resumed, range(3, 6))
    for (weights_a, params_a), (weights_b, params_b) in zip(original, continued, strict=True):
        assert torch.equal(weights_a, weights_b)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_a_checkpoint_off_the_simplex_is_refused_and_changes_nothing():
    net = Net()
    modo = fused_mtl.MoDo(net.trunk.parameters(), tasks=["a", "b", "c"])
    state = modo.state_dict()
    state["lambdas"] = torch.tensor([0.5, 2.0, -1.5], dtype=F64)
    before = modo.lambdas.clone()
    with pytest.raises(RuntimeError, match=re.escape("lambdas of task 'b' is 2.0")):
        modo.load_state_dict(state)
    assert torch.equal(modo.lambdas, before)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda p: fused_mtl.FAMO(2, lr=0), "FAMO: lr must be a number in"),
        (lambda p: fused_mtl.FAMO(2, gamma=-1.0), "FAMO: gamma must be"),
        (lambda p: fused_mtl.FAMO(2, min_losses=[0.0]), "FAMO: min_losses must be"),
        (lambda p: fused_mtl.STCH(2, mu=0.0), "STCH: mu must be"),
        (
            lambda p: fused_mtl.STCH(tasks=["a", "b"], preferences=[1, 0]),
            "STCH: task 'b': preferences is 0.0",
        ),
        (lambda p: fused_mtl.STCH(2, ideal_point=[0.0, math.inf]), "STCH: task 1: ideal_point"),
        (lambda p: fused_mtl.MoCo(p, 2, beta=2.0), "MoCo: beta must be"),
        (lambda p: fused_mtl.SDMGrad(p, 2, iterations=0), "SDMGrad: iterations must be"),
        (lambda p: fused_mtl.SDMGrad(p, 2, lam=-1.0), "SDMGrad: lam must be"),
        (lambda p: fused_mtl.MoDo(p, 2, gamma=0.0), "MoDo: gamma must be"),
        (lambda p: fused_mtl.ExcessMTL(p, 2, step_size=0.0), "ExcessMTL: step_size must be"),
    ],
)
def test_bad_hyper_parameters_name_the_method_and_the_parameter(build, match):
    with pytest.raises(ValueError, match=match):
        build(nn.Linear(2, 2).parameters())


def test_weight_losses_must_be_a_pair_of_task_losses():
    net = Net()
    sdmgrad = fused_mtl.SDMGrad(net.trunk.parameters(), tasks=["a", "b", "c"])
    losses = net.losses(batch(0))
    with pytest.raises(ValueError, match="SDMGrad: weight_losses must be a pair"):
        sdmgrad(losses, weight_losses=(losses,))
    with pytest.raises(ValueError, match=re.escape("SDMGrad: weight_losses[1]: expected 3")):
        sdmgrad(losses, weight_losses=(losses, losses[:2]))
    detached = torch.stack([losses[0], losses[1].detach(), losses[2]])
    with pytest.raises(ValueError, match=re.escape("SDMGrad: weight_losses[0]: task 'b'")):
        sdmgrad(losses, weight_losses=(detached, losses))
    assert torch.equal(sdmgrad.simplex_weights, torch.full((3,), 1 / 3, dtype=F64))


def test_moco_refuses_fsdp2_sharded_parameters(monkeypatch):
    import fused_mtl.balancer

    monkeypatch.setattr(fused_mtl.balancer, "is_sharded", lambda tensor: True)
    with pytest.raises(NotImplementedError, match="MoCo: FSDP2-sharded shared parameters"):
        fused_mtl.MoCo(nn.Linear(2, 2).parameters(), 2)


def test_weight_losses_are_refused_with_the_gram_by_layer():
    net = Net()
    modo = fused_mtl.MoDo(net.trunk, NUM_TASKS, gram_by_layer=True)
    losses = net.losses(batch(0))
    with pytest.raises(NotImplementedError, match="MoDo: weight_losses cannot be used"):
        modo(losses, weight_losses=(net.losses(batch(1)), net.losses(batch(2))))
    modo(net.losses(batch(3))).backward()  # one mini-batch works
    assert torch.isclose(modo.lambdas.sum(), torch.tensor(1.0, dtype=F64))


def test_training_calls_without_grad_change_nothing():
    """A validation pass under torch.no_grad() through a balancer in training mode (one that
    model.eval() does not reach) neither updates FAMO nor draws RLW's weights."""
    famo, rlw = fused_mtl.FAMO(2, lr=0.5), fused_mtl.RandomWeighting(2)
    famo(torch.tensor([1.0, 2.0]))
    famo.update(torch.tensor([0.5, 2.0]))
    state = copy.deepcopy(famo.state_dict())
    weights, rng = rlw.weights.clone(), torch.get_rng_state()
    with torch.no_grad():
        famo(torch.tensor([0.1, 3.0]))
        rlw(torch.tensor([0.1, 3.0]))
    for key, value in famo.state_dict().items():
        same = torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
        assert same, key
    assert torch.equal(rlw.weights, weights) and torch.equal(torch.get_rng_state(), rng)


def test_stch_stays_finite_for_a_tiny_mu():
    stch = fused_mtl.STCH(2, mu=1e-39)
    losses = torch.tensor([2.0, 0.5], requires_grad=True)
    total = stch(losses)
    total.backward()
    assert total.item() == pytest.approx(2.0)
    assert stch.weights.tolist() == [1.0, 0.0] and torch.isfinite(losses.grad).all()


def test_famo_check_accepts_a_loss_at_its_lower_bound():
    famo = fused_mtl.FAMO(tasks=["a", "b"], check_finite=True)
    famo(torch.tensor([0.0, 1.0]))  # a cross-entropy that reached 0: log(1e-8) is finite
    assert torch.isfinite(famo.weights).all()


def test_imtl_l_names_itself_for_a_negative_loss():
    imtl = fused_mtl.IMTLL(tasks=["a", "b"], check_finite=True)
    with pytest.raises(ValueError, match=re.escape("task 'b': loss is -0.5 < 0; IMTLL needs")):
        imtl(torch.tensor([1.0, -0.5]))


def test_moco_counts_its_steps_in_float64_on_a_bfloat16_model():
    trunk, heads = nn.Linear(3, 4).bfloat16(), nn.Linear(4, 2).bfloat16()
    moco = fused_mtl.MoCo(trunk.parameters(), 2)
    assert moco.steps.dtype == torch.float64 and moco.tracked_gradients.dtype == torch.float32
    moco.steps.fill_(256.0)  # bfloat16 would round 256 + 1 back to 256
    out = heads(trunk(torch.randn(8, 3, dtype=torch.bfloat16)))
    moco.backward([out[:, 0].float().square().mean(), out[:, 1].float().mean()])
    assert moco.steps.item() == 257.0


def test_excess_mtl_records_a_tasks_first_positive_risk():
    """A task without gradient in the first batch (a masked loss) gets its first estimate
    later, instead of a zero one that would silence it for good."""
    net = Net()
    excess = fused_mtl.ExcessMTL(net.trunk.parameters(), NUM_TASKS, step_size=0.5)
    for step in range(6):
        losses = net.losses(batch(step))
        mask = torch.tensor([1.0, 0.0 if step == 0 else 1.0, 1.0], dtype=F64)
        excess.backward(losses * mask)
        if step == 0:
            assert math.isnan(excess.initial_risks[1]) and excess.initial_risks[0] > 0
        sgd_step(net)
    assert excess.initial_risks[1] > 0
    assert excess.weights[1] > 0.5  # a zero first estimate drove it to 0.18 in 5 steps


# --- second derivatives: a backward with create_graph=True ------------------------------------
# A gradient penalty or a meta-learning outer loop differentiates the gradient again: the
# second derivative of the total in the model's parameters must be that of the method's total
# as a function of the losses, f(L(theta)), d2f/dL2 included.

SCALE = torch.tensor([1.5, -0.5], dtype=F64)


def losses_of(theta):
    """Three positive losses of two parameters, each curved, coupled through theta."""
    return torch.stack(
        [
            theta.square().sum() + 0.5,
            (theta[0] - 2 * theta[1]).exp(),
            (theta * SCALE.to(theta.dtype)).sum().square() + 1.0,
        ]
    )


def famo_objective(losses, min_losses):
    """The authors' FAMO objective at its first call (logits 0): sum_i z_i log(L_i - L*_i +
    1e-8) / c, with z = softmax(0) and c = sum_i z_i / (L_i - L*_i + 1e-8) held at the call's
    losses (their code detaches c)."""
    z = torch.full((3,), 1 / 3, dtype=F64)
    c = (z / (losses.detach() - min_losses + 1e-8)).sum()
    return (z * torch.log(losses - min_losses + 1e-8)).sum() / c


ideal, preferences = torch.tensor([0.1, 0.0, 0.3], dtype=F64), torch.tensor([1.0, 2.0, 0.5])
SECOND_ORDER = {
    "GeometricMean": (lambda: fused_mtl.GeometricMean(3), formulas.geometric_mean),
    "STCH": (
        lambda: fused_mtl.STCH(
            3, mu=0.5, ideal_point=ideal.tolist(), preferences=preferences.tolist()
        ),
        formulas.smooth_tchebycheff(0.5, ideal, preferences.to(F64)),
    ),
    "FAMO": (
        lambda: fused_mtl.FAMO(3, min_losses=[0.0, 0.1, 0.2]),
        lambda L: famo_objective(L, torch.tensor([0.0, 0.1, 0.2], dtype=F64)),
    ),
    "PBI": (
        lambda: fused_mtl.PBI(
            3, theta=2.0, ideal_point=ideal.tolist(), preferences=preferences.tolist()
        ),
        formulas.penalty_boundary_intersection(2.0, preferences.to(F64), ideal),
    ),
    "COSMOS": (
        lambda: fused_mtl.COSMOS(3, mu=3.0, preferences=preferences.tolist()),
        formulas.cosmos(3.0, preferences.to(F64)),
    ),
    # The weights are constants of the losses (detached, as in the paper).
    "UWSO": (
        lambda: fused_mtl.UWSO(3, temperature=0.5),
        lambda L: (formulas.uw_so_weights(L, 0.5) * L).sum(),
    ),
}
# float64 end to end: the same sums in another order (1e-13); float32: the losses and the
# weights rounded (1e-5 of the entries' size ~1-10).
SECOND_ORDER_TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-13},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def gradient_and_hessian(total_of, theta, dtype):
    """d total / d theta and its Jacobian, by autograd.grad(create_graph=True) twice."""
    point = theta.to(dtype).requires_grad_()
    (gradient,) = torch.autograd.grad(total_of(losses_of(point)), point, create_graph=True)
    rows = [torch.autograd.grad(gradient[i], point, retain_graph=True)[0] for i in range(2)]
    return gradient.detach(), torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", list(SECOND_ORDER))
@pytest.mark.parametrize("theta", [[0.3, -0.2], [-0.8, 0.5]])
def test_second_derivatives_are_those_of_the_methods_total(method, theta, dtype):
    build, objective = SECOND_ORDER[method]
    theta = torch.tensor(theta, dtype=F64)
    gradient, hessian = gradient_and_hessian(build(), theta, dtype)
    expected_gradient, expected_hessian = gradient_and_hessian(objective, theta, F64)
    tolerance = SECOND_ORDER_TOL[dtype]
    torch.testing.assert_close(gradient.double(), expected_gradient, **tolerance)
    torch.testing.assert_close(hessian.double(), expected_hessian, **tolerance)


@pytest.mark.parametrize("method", list(SECOND_ORDER))
def test_without_create_graph_the_total_and_gradient_are_the_weighted_sums(method):
    """A plain backward keeps its numbers: the total is the objective's value plus
    sum_i w_i (L_i - L_i), its gradient sum_i w_i grad L_i with the call's weights, bit for
    bit, in every precision."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        theta = torch.tensor([0.3, -0.2], dtype=dtype, requires_grad=True)
        losses = losses_of(theta)
        balancer = SECOND_ORDER[method][0]()
        total = balancer(losses)
        (gradient,) = torch.autograd.grad(total, theta, retain_graph=True)
        weights = balancer.weights
        promoted = torch.promote_types(weights.dtype, dtype)
        expected = (weights.to(promoted) * (losses - losses.detach()).to(promoted)).sum()
        (expected_gradient,) = torch.autograd.grad(expected, theta)
        assert total.dtype == torch.promote_types(promoted, torch.float32)
        assert torch.equal(gradient, expected_gradient)


def test_second_derivatives_from_another_calls_losses_are_refused():
    """Under step_with the weights are those of the step's mean losses, not this call's: a
    backward with create_graph=True says so instead of differentiating another function."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    stch = fused_mtl.STCH(3)
    stch.step_with(torch.optim.SGD([theta], lr=0.1))
    total = stch(losses_of(theta))
    torch.autograd.grad(total, theta)  # a plain backward works
    with pytest.raises(RuntimeError, match="STCH: a backward with create_graph=True needs"):
        torch.autograd.grad(stch(losses_of(theta) * 2), theta, create_graph=True)
