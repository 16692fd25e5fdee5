"""Every method under autocast (bf16, fp16) and with a GradScaler, on CPU.

What the balancer computes — weights, norms, the solver, the total — is float32 whatever
autocast does to the model (float64 for float64 inputs); the Gram matrix is float64 always.
The total's dtype follows one rule for every method: ``promote_types(weights.dtype,
losses.dtype)``, float32 here.
"""

import copy

import distributed_worker as worker
import pytest
import torch
from test_callable_contract import METHODS, make

from fused_mtl import functional

DTYPES = [torch.bfloat16, torch.float16]


def autocast_step(net, balancer, method, inputs, targets, dtype, half_losses, call):
    """One step with autocast around the forward and the losses (cast to ``dtype`` when
    ``half_losses``, as a loss computed in half precision would be); the total, the losses and
    the weights the call used."""
    with torch.autocast("cpu", dtype=dtype):
        features, outputs = net(inputs)
        losses = worker.task_losses(outputs, targets)
        if half_losses:
            losses = losses.to(dtype)
        if method == "dtp":
            balancer.update_kpis(worker.kpis(outputs.float(), targets))
        extra = {"features": features} if method == "mgda_ub" else {}
        total = balancer(losses, **extra) if call else balancer.backward(losses, **extra)
        used = balancer.weights.detach().clone()
    if call:
        total.backward()
    return total, losses, used


@pytest.mark.parametrize("call", [True, False], ids=["call", "backward"])
@pytest.mark.parametrize("half_losses", [False, True], ids=["fp32_losses", "half_losses"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_autocast(method, dtype, half_losses, call):
    inputs, targets = worker.global_batch(1)
    net, balancer = make(method)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        total, losses, used = autocast_step(
            net, balancer, method, inputs, targets, dtype, half_losses, call
        )
        if method == "gradnorm":
            # The weights are used at float32 precision: the total is their float32 weighted
            # sum, not a sum in the losses' half precision.
            assert torch.equal(total.detach(), (used * losses.detach().float()).sum())
        optimizer.step()
        assert total.dtype == torch.float32
        assert torch.isfinite(total)
        assert balancer.weights.dtype == torch.float32
        assert torch.isfinite(balancer.weights).all()
        for parameter in balancer.parameters():
            assert parameter.grad.dtype == torch.float32
    if method in ("mgda", "mgda_ub"):
        assert balancer.gram.dtype == torch.float64
    if method == "gradnorm":
        assert balancer.grad_norms.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_task_gram_is_float64_and_norms_float32_under_autocast(dtype):
    grads = torch.randn(3, 100)
    with torch.autocast("cpu", dtype=dtype):
        gram = functional.task_gram(grads)
        norms = functional.task_grad_norms(grads)
    assert gram.dtype == torch.float64
    assert norms.dtype == torch.float32
    expected = grads.double() @ grads.double().T
    assert torch.allclose(gram.double(), expected, rtol=1e-5)
    assert torch.allclose(norms.double(), expected.diagonal().sqrt(), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_grad_scaler_unscales_to_the_unscaled_step(method):
    """fp16 autocast: a GradScaler step's gradients after unscale_ equal the same step without
    scaling. The scale is a power of two, which commutes with rounding in the normal range, so
    the balancer's own gradients (float32) are equal bit for bit."""
    inputs, targets = worker.global_batch(1)
    runs = []
    for scaled in (False, True):
        net, balancer = make(method)
        optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        with torch.autocast("cpu", dtype=torch.float16):
            features, outputs = net(inputs)
            extra = {"features": features} if method == "mgda_ub" else {}
            if method == "dtp":
                balancer.update_kpis(worker.kpis(outputs.float(), targets))
            total = balancer(worker.task_losses(outputs, targets), **extra)
        if scaled:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        runs.append((net, balancer))
    (net, balancer), (scaled_net, scaled_balancer) = runs
    for parameter, scaled in zip(balancer.parameters(), scaled_balancer.parameters(), strict=True):
        assert torch.equal(parameter.grad, scaled.grad)
    for parameter, scaled in zip(net.parameters(), scaled_net.parameters(), strict=True):
        assert torch.allclose(parameter.grad, scaled.grad, rtol=1e-3, atol=1e-6)


def test_grad_scaler_skipped_step_leaves_the_weights():
    """A step whose scaled gradients overflow is skipped: GradNorm's weights keep their values
    (their update is a gradient like the model's), and the next call renormalises them."""
    inputs, targets = worker.global_batch(1)
    net, balancer = make("gradnorm")
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = copy.deepcopy(balancer.state_dict())
    _, outputs = net(inputs)
    # Losses of 1e20, gradients of 1e20 times the scale: they overflow float32.
    losses = worker.task_losses(outputs, targets) * 1e20
    scaler.scale(balancer(losses)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**100  # the step was skipped
    assert torch.equal(balancer.weights, before["weights"])
