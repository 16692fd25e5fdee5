"""Findings of the adversarial audit: each test fails on the code before its fix."""

import math
import warnings

import formulas
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fused_mtl
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


class BypassNet(torch.nn.Module):
    """A shared trunk (a small conv net, or a transformer encoder layer over a sequence) with
    one head, and a second task's output computed from the inputs alone: its loss never
    reaches the trunk. Both outputs come out as the columns of one tensor."""

    def __init__(self, trunk):
        super().__init__()
        if trunk == "conv":
            self.trunk = torch.nn.Sequential(
                torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten()
            )
            self.shape, width = (4, 1, 5, 5), 3 * 3 * 3
        else:
            self.trunk = torch.nn.Sequential(
                torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                torch.nn.Flatten(),
            )
            self.shape, width = (4, 3, 4), 3 * 4
        self.head = torch.nn.Linear(width, 1)
        self.bypass = torch.nn.Linear(math.prod(self.shape[1:]), 1)

    def per_sample_losses(self, inputs, targets):
        outputs = torch.cat([self.head(self.trunk(inputs)), self.bypass(inputs.flatten(1))], 1)
        return (outputs - targets).square()


BALANCERS = {
    "MGDA": lambda shared, mode: fused_mtl.MGDA(shared, tasks=["a", "b"], per_task_gradients=mode),
    "GradNorm": lambda shared, mode: fused_mtl.GradNorm(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
    "UPGrad": lambda shared, mode: fused_mtl.UPGrad(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
    "MoCo": lambda shared, mode: fused_mtl.MoCo(shared, tasks=["a", "b"], per_task_gradients=mode),
    "GradDrop": lambda shared, mode: fused_mtl.GradDrop(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
    "NTKMTL": lambda shared, mode: fused_mtl.NTKMTL(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
    "DBMTL": lambda shared, mode: fused_mtl.DBMTL(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
    "CRMOGM": lambda shared, mode: fused_mtl.CRMOGM(
        shared, tasks=["a", "b"], per_task_gradients=mode
    ),
}
#: How a training loop hands over the losses of a tensor of per-sample, per-task losses: one
#: (K,) tensor of one operation, the stack of its columns' means, or the columns one by one.
#: None of these graphs shows that task b's loss does not reach the trunk.
FROM_COLUMNS = {
    "mean(0)": lambda per_sample: per_sample.mean(0),
    "stack": lambda per_sample: torch.stack([column.mean() for column in per_sample.T]),
    "list": lambda per_sample: [column.mean() for column in per_sample.T],
}


@pytest.mark.parametrize("given", list(FROM_COLUMNS))
@pytest.mark.parametrize("mode", ["auto", "loop", "batched"])
@pytest.mark.parametrize("method", list(BALANCERS))
@pytest.mark.parametrize("trunk", ["conv", "encoder"])
def test_a_task_that_never_reaches_the_shared_parameters_is_named_from_its_gradient(
    trunk, method, mode, given
):
    """Task b's loss never reaches the trunk, and the graph cannot show it (its losses are
    columns of one tensor): MGDA gave it all the weight and the trunk a zero update, every
    step. Its gradient is exactly zero and no path leads there, at the first call and at the
    second, which names it as a graph would (a single zero step is not a fault: see below)."""
    torch.manual_seed(0)
    net = BypassNet(trunk)
    balancer = BALANCERS[method](net.trunk.parameters(), mode)
    inputs, targets = torch.randn(net.shape), torch.randn(net.shape[0], 2)
    balancer(FROM_COLUMNS[given](net.per_sample_losses(inputs, targets))).backward()
    with pytest.raises(
        ValueError,
        match=r"task 'b': its loss does not depend on the shared parameters \(choose "
        r"parameters that all tasks use\); found from its gradient: exactly zero, with no path "
        r"from its loss to them, at each of the first 2 calls",
    ):
        balancer(FROM_COLUMNS[given](net.per_sample_losses(inputs * 0.5, targets)))


class ZeroHeadNet(torch.nn.Module):
    """A conv trunk and two heads whose outputs are the columns of one tensor: a head that
    starts at zero (weight and bias), and one that ends in a ReLU."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten()
        )
        self.zero_head = torch.nn.Linear(27, 1)
        torch.nn.init.zeros_(self.zero_head.weight)
        torch.nn.init.zeros_(self.zero_head.bias)
        self.relu_head = torch.nn.Linear(27, 1)

    def per_sample_losses(self, inputs, targets):
        features = self.trunk(inputs)
        outputs = torch.cat([self.zero_head(features), torch.relu(self.relu_head(features))], 1)
        return (outputs - targets).square()


@pytest.mark.parametrize("given", list(FROM_COLUMNS))
@pytest.mark.parametrize("mode", ["auto", "loop"])
@pytest.mark.parametrize("method", ["MGDA", "GradNorm", "UPGrad"])
def test_a_gradient_that_is_zero_at_one_step_is_not_named(method, mode, given):
    """As from the graph, a task whose loss reaches the trunk is not named for a zero gradient:
    a head initialised at zero (its trunk gradient is a product with the zero weight: a NaN
    crosses it), or a batch on which its head's ReLU is inactive for every sample (the first
    one: the next batch's gradient is not zero). Five steps train without an error."""
    torch.manual_seed(1)
    net = ZeroHeadNet()
    balancer = BALANCERS[method](net.trunk.parameters(), mode)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.1)
    inputs, targets = torch.randn(4, 1, 5, 5), torch.randn(4, 2)
    for step in range(5):
        with torch.no_grad():
            net.relu_head.bias.fill_(-100.0 if step == 0 else 100.0)  # inactive, then active
        optimizer.zero_grad()
        balancer(FROM_COLUMNS[given](net.per_sample_losses(inputs, targets))).backward()
        optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


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


def dwa_period_reference(calls, period_steps, temperature, num_tasks):
    """The weights each call uses, from the paper's rule in plain Python floats: a period is
    ``period_steps`` calls with finite losses (the others are left out), its means are their
    averages, and from the third period on ``w = K softmax(r / T)`` with
    ``r = mean(t-1) / mean(t-2)``. The call that completes a period still uses that period's
    weights."""
    weights, period, means, used = [1.0] * num_tasks, [], [], []
    for losses in calls:
        used.append(list(weights))
        if not all(math.isfinite(value) for value in losses):
            continue
        period.append(losses)
        if len(period) == period_steps:
            means.append([sum(column) / period_steps for column in zip(*period, strict=True)])
            period = []
            if len(means) >= 2:
                rates = [a / b for a, b in zip(means[-1], means[-2], strict=True)]
                exps = [math.exp(rate / temperature) for rate in rates]
                weights = [num_tasks * e / sum(exps) for e in exps]
    return used


def test_a_nan_loss_leaves_dwa_as_it_was_and_the_periods_go_on():
    """One NaN loss used to stay in the period sums for good: every later period end was
    rejected and no period closed again. Now the call is left out, on the device."""
    dwa = DWA(tasks=["depth", "seg"], period_steps=2)
    calls = [
        [2.0, 1.0],
        [2.0, 1.0],
        [1.0, 1.0],
        [math.nan, 1.0],
        [1.0, 1.0],
        [1.0, 2.0],
        [1.0, 2.0],
    ]
    expected = dwa_period_reference(calls, 2, 2.0, 2)
    with pytest.warns(RuntimeWarning, match=r"period 1 left out .*task 'depth': 1"):
        for index, losses in enumerate(calls):
            before = {
                name: value.clone()
                for name, value in dwa.state_dict().items()
                if isinstance(value, torch.Tensor)
            }
            total = dwa(torch.tensor(losses))
            weights_used = total.detach() if math.isnan(losses[0]) else None
            if index == 3:
                assert weights_used is not None and math.isnan(float(weights_used))
                after = dwa.state_dict()
                for name, value in before.items():
                    torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True)
                assert dwa.steps_in_period == 1
            else:
                want = sum(w * x for w, x in zip(expected[index], losses, strict=True))
                assert float(total) == pytest.approx(want, rel=1e-6), index
    assert dwa.periods_finished == 3
    assert dwa.weights.tolist() == pytest.approx(
        dwa_period_reference([*calls, [1.0, 1.0]], 2, 2.0, 2)[-1], rel=1e-6
    )


dwa_calls = st.lists(
    st.lists(
        st.one_of(
            st.floats(0.05, 20.0),
            st.sampled_from([math.nan, math.inf]),
        ),
        min_size=3,
        max_size=3,
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    calls=dwa_calls,
    period_steps=st.integers(1, 4),
    temperature=st.sampled_from([0.5, 2.0, 10.0]),
)
def test_dwa_period_rule_over_random_histories(calls, period_steps, temperature):
    """Every call uses the weights of its period, a call with a non-finite loss changes
    nothing, and the weights follow the paper's rule (float64 reference, float32 state)."""
    expected = dwa_period_reference(calls, period_steps, temperature, 3)
    dwa = DWA(3, temperature=temperature, period_steps=period_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for index, losses in enumerate(calls):
            total = float(dwa(torch.tensor(losses)))
            if all(math.isfinite(value) for value in losses):
                want = sum(w * x for w, x in zip(expected[index], losses, strict=True))
                assert total == pytest.approx(want, rel=1e-5), (index, losses)
    finite = [c for c in calls if all(math.isfinite(v) for v in c)]
    assert dwa.periods_finished == len(finite) // period_steps
    assert dwa.steps_in_period == len(finite) % period_steps


def test_unclear_errors_now_name_the_argument_or_the_task():
    from fused_mtl import MGDA, GradNorm
    from fused_mtl import functional as F

    with pytest.raises(TypeError, match=r"task_types must be one string .* got int 5"):
        UncertaintyWeighting(2, task_types=5)
    with pytest.raises(ValueError, match=r"task 'b': init_log_var is nan; it must be a finite"):
        UncertaintyWeighting(tasks=["a", "b"], init_log_var=[0.0, math.nan])
    with pytest.raises(ValueError, match=r"task 0: init_log_var is inf"):
        UncertaintyWeighting(2, init_log_var=math.inf)
    with pytest.raises(TypeError, match="init_log_var must be one number or 2 numbers"):
        UncertaintyWeighting(2, init_log_var="zero")
    with pytest.raises(ValueError, match=r"log_var_bounds must satisfy -80 <= lower < upper <= 80"):
        UncertaintyWeighting(2, log_var_bounds=(5.0, -5.0))
    with pytest.raises(TypeError, match="losses must be one tensor of shape"):
        F.uncertainty_weighting([torch.tensor(1.0), torch.tensor(2.0)], torch.zeros(2))

    for make in (lambda p: GradNorm(p, 2), lambda p: MGDA(p, 2)):
        trunk = torch.nn.Linear(3, 2)
        balancer = make(trunk)
        trunk.bias.requires_grad_(False)
        out = trunk(torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"shared parameter 'bias' \(shape \(2,\)\) does not"):
            balancer([out[:, 0].mean(), out[:, 1].mean()])
        trunk.bias.requires_grad_(True)
        with torch.no_grad():
            out = trunk(torch.randn(4, 3))
            with pytest.raises(RuntimeError, match="backward was called with grad disabled"):
                balancer.backward([out[:, 0].mean(), out[:, 1].mean()])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"UncertaintyWeighting\.backward"):
        UncertaintyWeighting(2).backward(torch.ones(2))


def test_checkpoints_keep_the_task_names_and_refuse_another_order():
    """Task names were not saved: a module with the tasks in another order took each task's
    log-variance for another task's without a word."""
    saved = UncertaintyWeighting(tasks=["depth", "seg"], init_log_var=[1.0, -2.0])
    state = saved.state_dict()
    assert state["_extra_state"]["tasks"] == ["depth", "seg"]
    swapped = UncertaintyWeighting(tasks=["seg", "depth"])
    with pytest.raises(RuntimeError, match=r"its tasks are in another order: saved \['depth'"):
        swapped.load_state_dict(state)
    assert swapped.log_vars.tolist() == [0.0, 0.0]  # nothing loaded
    other = UncertaintyWeighting(tasks=["depth", "normals"])
    with pytest.raises(RuntimeError, match=r"its tasks are \['depth', 'seg'\], this module's"):
        other.load_state_dict(state)
    same = UncertaintyWeighting(tasks=["depth", "seg"])
    same.load_state_dict(state)
    assert same.log_vars.tolist() == [1.0, -2.0]
    # A checkpoint saved before the names were (no extra state) loads, strictly.
    legacy = {"log_vars": torch.tensor([0.5, 0.25])}
    same.load_state_dict(legacy)
    assert same.log_vars.tolist() == [0.5, 0.25]


def test_checkpoints_with_values_a_method_cannot_use_are_refused():
    from fused_mtl import DTP, GradNorm

    def refused(module, key, value, message):
        state = module.state_dict()
        state[key] = value
        before = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
        with pytest.raises(RuntimeError, match=message):
            module.load_state_dict(state)
        after = module.state_dict()
        for name, tensor in before.items():
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True)

    uw = UncertaintyWeighting(tasks=["depth", "seg"])
    refused(uw, "log_vars", torch.tensor([0.0, math.nan]), r"log_vars of task 'seg' is nan")
    refused(AutomaticWeightedLoss(2), "params", torch.tensor([math.inf, 1.0]), r"params of task 0")
    gradnorm = GradNorm(torch.nn.Linear(2, 2), tasks=["a", "b"])
    refused(
        gradnorm,
        "initial_losses",
        torch.tensor([1.0, -1.0]),
        r"initial_losses of task 'b' is -1.0; GradNorm's training rates",
    )
    state = gradnorm.state_dict()
    gradnorm.load_state_dict(state)  # all NaN: not recorded yet, accepted
    dtp = DTP(tasks=["a", "b"])
    refused(dtp, "kpi_average", torch.tensor([0.5, math.inf]), r"kpi_average of task 'b' is inf")
    dwa = DWA(tasks=["a", "b"], period_steps=3)
    refused(
        dwa,
        "period_means",
        torch.tensor([[1.0, -2.0], [math.nan, math.nan]]),
        r"period_means of task 'b' is -2.0",
    )
    refused(
        dwa,
        "_extra_state",
        {"tasks": ["a", "b"], "steps_in_period": 3, "periods_finished": 0},
        "steps_in_period 3",
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_gram_is_exactly_symmetric_on_both_backends(backend):
    """The torch backend's G G^T rounded its triangles apart (2.7e-5 at K = 8, P = 4097)."""
    from fused_mtl.functional import task_gram

    gen = torch.Generator().manual_seed(0)
    for num_tasks in (3, 8):
        grads = [
            torch.randn(num_tasks, 4097, generator=gen),
            torch.randn(num_tasks, 7, 3, generator=gen),
        ]
        gram = task_gram(grads, backend=backend)
        assert torch.equal(gram, gram.T)
        exact = formulas.gram([g.double() for g in grads])[0]
        assert float((gram.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_documented_range_of_the_float32_norms(backend):
    """reference.task_grad_norms documents where float32 norms are exact: 1e-18 to 1.8e19
    (1.5e-7 relative), and how they degrade outside. Rows of 100 equal elements."""
    from fused_mtl.functional import task_grad_norms

    for element, rtol in ((1.7e18, 2e-7), (1e-19, 2e-7), (1e-20, 3e-6), (1e-21, 3e-4)):
        norms = task_grad_norms(torch.full((2, 100), element), backend=backend)
        assert float(norms[0]) == pytest.approx(10 * element, rel=rtol), element
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow in the interpreter
        assert math.isinf(float(task_grad_norms(torch.full((2, 100), 1e19), backend=backend)[0]))


def test_an_uncertainty_module_pickled_whole_before_the_range_loads():
    import io

    uw = UncertaintyWeighting(2, init_log_var=[0.5, -0.5])
    del uw.__dict__["log_var_bounds"]
    buffer = io.BytesIO()
    torch.save(uw, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    losses = torch.tensor([1.0, 2.0])
    expected = formulas.log_variance(
        losses.double(), torch.tensor([0.5, -0.5], dtype=torch.float64)
    )
    assert float(loaded(losses)) == pytest.approx(float(expected.total), rel=1e-6)


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what ``.item()``, ``int()``, ``bool()`` and indexing
    with a 0-dim tensor call, a device-to-host read (a synchronisation on CUDA)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_tasks", [3, 12, 64])
def test_the_min_norm_solver_reads_nothing_on_the_host(num_tasks):
    """Its last step indexed with a 0-dim argmin, which reads the index on the host."""
    from fused_mtl.reference import min_norm_weights

    grads = torch.randn(num_tasks, 30, dtype=torch.float64)
    with HostReads() as reads:
        min_norm_weights(grads @ grads.T)
    assert reads.count == 0


def test_uncertainty_weighting_goes_through_torch_func():
    """The bounded parameter is an autograd.Function: torch.func needs its setup_context."""
    uw = UncertaintyWeighting(3, backend="torch")
    losses = torch.tensor([0.5, 1.0, 2.0])
    params = {"log_vars": torch.tensor([0.0, 0.0, -25.0])}
    grads = torch.func.grad(lambda p: torch.func.functional_call(uw, p, (losses,)))(params)
    # d/ds = 1 - e^-s L at the clamped s; the third is below -20 and its slope 1 - e^20 * 2 < 0
    # moves it back in: kept.
    expected = 1 - torch.exp(-params["log_vars"].clamp(-20, 20)) * losses
    torch.testing.assert_close(grads["log_vars"], expected, rtol=1e-6, atol=0)
    batched = torch.func.vmap(lambda row: uw(row))(torch.rand(4, 3))
    assert batched.shape == (4,)


def test_checkpoint_checks_accept_what_the_methods_save_and_name_malformed_counters():
    from fused_mtl import DWA

    dwa = DWA(2, temperature=0.1, period_steps=1)
    for losses in ([1.0, 1.0], [1.0, 1.0], [1000.0, 1.0]):
        dwa(torch.tensor(losses))
    assert 0.0 in dwa.weights.tolist()  # a weight that underflowed: valid state
    DWA(2, temperature=0.1, period_steps=1).load_state_dict(dwa.state_dict())
    state = dwa.state_dict()
    state["_extra_state"] = {"tasks": None, "steps_in_period": "x", "periods_finished": 0}
    with pytest.raises(RuntimeError, match="DWA checkpoint: its counters are not integers"):
        dwa.load_state_dict(state)
    with pytest.raises(ValueError, match=r"log_var_bounds must satisfy -80 <= lower < upper"):
        UncertaintyWeighting(2, log_var_bounds=(-1.0, 1e39))
