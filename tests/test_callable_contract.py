"""``total = balancer(losses)`` and any backward of it equal ``balancer.backward(losses)``.

For every method, two copies of one model and balancer train side by side for a few steps: one
with ``balancer.backward(losses)``, the other with ``balancer(losses)`` and a backward of the
total scaled by 1024, as a ``GradScaler`` does, then unscaled. Scaling by a power of two is exact
in floating point, so the gradients, weights and totals must be identical, bit for bit.
"""

import copy

import distributed_worker as worker
import pytest
import torch

from fused_mtl.compat import MultiNoiseLoss

METHODS = [*worker.METHODS, "multi_noise"]
#: Every other method built on the trunk, every other loss-level one and GradDrop: the
#: single-process contracts of this file.
MORE_METHODS = [
    *(m for m in worker.GRAM_METHODS if m not in worker.METHODS),
    *(m for m in worker.LOSS_METHODS if m not in worker.METHODS),
    "graddrop",
]
SCALE = 1024.0


def make(method):
    torch.manual_seed(0)
    net = worker.Net()
    if method == "multi_noise":
        balancer = MultiNoiseLoss(worker.NUM_TASKS)
    else:
        balancer = worker.make_balancer(method, net)
    return net, balancer


class BackwardInsteadOfCall:
    """Stands in for the balancer in ``worker.balanced_total``: its call is ``backward``."""

    def __init__(self, balancer):
        self.balancer = balancer

    def update_kpis(self, kpis):
        self.balancer.update_kpis(kpis)

    def __call__(self, losses, **extra):
        return self.balancer.backward(losses, **extra)


def step(net, balancer, method, inputs, targets, call):
    features, outputs = net(inputs)
    if not call:
        return worker.balanced_total(
            BackwardInsteadOfCall(balancer), method, features, outputs, targets
        )
    total = worker.balanced_total(balancer, method, features, outputs, targets)
    (total * SCALE).backward()
    for parameter in [*net.parameters(), *balancer.parameters()]:
        parameter.grad /= SCALE
    return total.detach()


def gradients(net, balancer):
    return [p.grad.clone() for p in [*net.parameters(), *balancer.parameters()]]


@pytest.mark.parametrize("method", METHODS + MORE_METHODS)
def test_call_then_scaled_backward_equals_backward(method):
    inputs, targets = worker.global_batch(1)
    pairs = []
    for call in (False, True):
        net, balancer = make(method)
        optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
        pairs.append((net, balancer, optimizer, call))
    for index in range(4):
        seen = []
        for net, balancer, optimizer, call in pairs:
            torch.manual_seed(index)  # the randomised methods draw alike in both copies
            optimizer.zero_grad()
            total = step(net, balancer, method, inputs, targets, call)
            seen.append((total, gradients(net, balancer), balancer.weights.clone()))
            optimizer.step()
        (total_a, grads_a, weights_a), (total_b, grads_b, weights_b) = seen
        assert torch.equal(total_a, total_b)
        assert torch.equal(weights_a, weights_b)
        for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
            assert torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("method", ["gradnorm", "mgda", "mgda_ub", "gradvac", "graddrop"])
def test_gradient_methods_report_in_eval_mode_and_under_no_grad(method):
    """Validation: the call returns sum_i w_i L_i with the current weights and changes nothing."""
    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    step(net, balancer, method, inputs, targets, call=True)
    state = copy.deepcopy(balancer.state_dict())
    weights = balancer.weights.detach().clone()
    for mode in ("eval", "no_grad"):
        balancer.train(mode != "eval")
        with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
            features, outputs = net(inputs)
            losses = worker.task_losses(outputs, targets).detach()
            extra = {"features": features} if method == "mgda_ub" else {}
            total = balancer(losses, **extra)
        assert torch.equal(total, (weights * losses).sum())
        assert torch.equal(balancer.weights, weights)
        for key, value in balancer.state_dict().items():
            assert torch.equal(value, state[key]) if torch.is_tensor(value) else value == state[key]


def test_gradnorm_weight_gradient_is_its_update_not_a_gradient_of_the_total():
    """The weights' .grad after total.backward() is GradNorm's rule: d total / d w would be the
    losses, which is not what GradNorm trains its weights with."""
    inputs, targets = worker.global_batch(1)
    net, balancer = make("gradnorm")
    _, outputs = net(inputs)
    losses = worker.task_losses(outputs, targets)
    balancer(losses).backward()
    assert not torch.allclose(balancer.learned_weights.grad, losses.detach())
    # GradNorm's gradient is sign(G_i - T_i) ||g_i||: its magnitudes are the gradient norms.
    assert torch.allclose(balancer.learned_weights.grad.abs(), balancer.grad_norms)


@pytest.mark.parametrize("method", METHODS + MORE_METHODS)
def test_one_process_communicates_nothing(method, monkeypatch):
    """Without torch.distributed initialised, no balancer calls a collective."""

    def collective(*args, **kwargs):
        raise AssertionError("a collective was called in a single process")

    for name in worker.COUNTED:
        if hasattr(torch.distributed, name):
            monkeypatch.setattr(torch.distributed, name, collective)
    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    for _ in range(3):
        step(net, balancer, method, inputs, targets, call=True)


def test_gradnorm_total_is_the_weighted_sum_even_when_its_update_is_not_finite():
    """A loss so large that a gradient norm overflows: the weights' update is not finite, the
    total is still sum_i w_i L_i, exactly."""
    inputs, targets = worker.global_batch(1)
    net, balancer = make("gradnorm")
    _, outputs = net(inputs)
    losses = worker.task_losses(outputs, targets) * torch.tensor([1e25, 1.0, 1.0])
    total = balancer(losses)
    assert not torch.isfinite(balancer.grad_norms).all()
    assert torch.equal(total, (balancer.weights.detach() * losses).sum())
    assert torch.isfinite(total)


@pytest.mark.parametrize("method", ["gradnorm", "mgda", "upgrad"])
def test_two_calls_then_one_backward(method):
    """Two balanced totals (two micro-batches, say) summed, then one backward: each total keeps
    the weights it was computed with, and the gradients add up."""
    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    halves = [slice(0, 4), slice(4, 8)]
    totals, weights = [], []
    for rows in halves:
        _, outputs = net(inputs[rows])
        totals.append(balancer(worker.task_losses(outputs, targets[rows])))
        weights.append(balancer.weights.detach().clone())
    (totals[0] + totals[1]).backward()
    together = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for rows, used in zip(halves, weights, strict=True):
        _, outputs = net(inputs[rows])
        (used * worker.task_losses(outputs, targets[rows])).sum().backward()
    for got, expected in zip(together, (p.grad for p in net.parameters()), strict=True):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["gradnorm", "mgda"])
def test_gradient_method_pickled_whole_before_it_could_sync_loads(method):
    import io

    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    del balancer.__dict__["_sync"], balancer.__dict__["_sharded"]
    buffer = io.BytesIO()
    torch.save({"net": net, "balancer": balancer}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    net, balancer = loaded["net"], loaded["balancer"]
    total = step(net, balancer, method, inputs, targets, call=True)
    assert torch.isfinite(total)


@pytest.mark.parametrize("method", METHODS + MORE_METHODS)
def test_a_model_with_its_balancer_copies_and_pickles_after_a_step_and_the_copy_trains_alike(
    method,
):
    """An EMA model (copy.deepcopy) or a checkpoint of the whole model (torch.save) taken after
    a training step, the balancer inside: the balancer holds none of the step's tensors (MGDA-UB
    held the features, a non-leaf tensor that deepcopy refuses), and each copy's next step is
    the original's, bit for bit."""
    import io

    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    whole = torch.nn.ModuleDict({"net": net, "balancer": balancer})
    torch.manual_seed(0)
    step(net, balancer, method, inputs, targets, call=True)
    buffer = io.BytesIO()
    torch.save(whole, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(whole), torch.load(buffer, weights_only=False)]
    seen = []
    for model in [whole, *copies]:
        model.zero_grad()
        torch.manual_seed(1)  # the randomised methods draw alike in every copy
        total = step(model["net"], model["balancer"], method, inputs * 0.5, targets, call=True)
        seen.append((total, model["balancer"].weights.clone(), gradients(*model.values())))
    (total, weights, grads), *others = seen
    for other_total, other_weights, other_grads in others:
        assert torch.equal(other_total, total)
        assert torch.equal(other_weights, weights)
        for got, expected in zip(other_grads, grads, strict=True):
            assert torch.equal(got, expected)
