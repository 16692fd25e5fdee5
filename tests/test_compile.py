"""torch.compile(fullgraph=True) of a training step that calls the modules, and the registered
ops' own consistency checks (schema, fake kernels, autograd registration)."""

import pytest
import torch

from fused_mtl import UncertaintyWeighting
from fused_mtl.compat import AutomaticWeightedLoss
from fused_mtl.functional import task_grad_norms, task_gram
from fused_mtl.ops.gram import _task_gram_op
from fused_mtl.ops.uncertainty import _backward_op, _forward_op
from fused_mtl.reference import Parametrization, parameter_bounds


def make_step(balancer):
    def step(x, y):
        return balancer({"depth": (x**2).mean(), "seg": (y - 1).abs().mean()})

    return step


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fullgraph_compile_matches_eager(backend, compiler, device):
    torch._dynamo.reset()
    uw = UncertaintyWeighting(tasks=["depth", "seg"], init_log_var=[0.2, -0.4], backend=backend).to(
        device
    )
    x = torch.randn(8, device=device, requires_grad=True)
    y = torch.randn(8, device=device)
    step = make_step(uw)

    eager = step(x, y)
    eager.backward()
    eager_grads = (x.grad.clone(), uw.log_vars.grad.clone())
    x.grad, uw.log_vars.grad = None, None

    compiled = torch.compile(step, fullgraph=True, backend=compiler)(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, eager_grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(uw.log_vars.grad, eager_grads[1], rtol=1e-6, atol=1e-7)


def test_compiled_triton_step_uses_the_registered_op(device):
    torch._dynamo.reset()
    awl = AutomaticWeightedLoss(2, backend="triton").to(device)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def step(a, b):
        return awl(a.sum(), b.sum())

    a, b = torch.rand(3, device=device), torch.rand(3, device=device)
    torch.compile(step, fullgraph=True, backend=capture)(a, b)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.fused_mtl.uncertainty_weighting.default in targets


@pytest.mark.parametrize("parametrization", [0, 1, 2])
def test_opcheck(parametrization, device):
    gen = torch.Generator().manual_seed(parametrization)
    losses = torch.rand(5, generator=gen).to(device).requires_grad_()
    params = (torch.rand(5, generator=gen) + 0.5).to(device).requires_grad_()
    coefs = (torch.full((5,), 0.5, device=device), torch.ones(5, device=device))
    bounds = parameter_bounds(Parametrization(parametrization))
    args = (
        losses,
        params,
        *(coefs if parametrization == 0 else (None, None)),
        parametrization,
        *bounds,
    )
    torch.library.opcheck(_forward_op, args)
    grad = torch.tensor(0.5, device=device)
    torch.library.opcheck(
        _backward_op, (grad, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    )


@pytest.mark.parametrize("diagonal", [True, False])
def test_task_gram_opcheck(diagonal, device):
    gen = torch.Generator().manual_seed(7)
    grads = [
        torch.randn(3, 4, 5, generator=gen).to(device).requires_grad_(),
        torch.randn(3, 2, generator=gen).to(device).requires_grad_(),
    ]
    torch.library.opcheck(_task_gram_op, ([g.reshape(3, -1) for g in grads], diagonal))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_task_gram_matches_eager(compiler, device):
    """A compiled function of the Gram (and its gradient) traces the registered op as one node."""
    torch._dynamo.reset()
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def objective(weight_grads, bias_grads):
        matrix = task_gram([weight_grads, bias_grads], backend="triton")
        return matrix.sum() + task_grad_norms([weight_grads, bias_grads], backend="triton").sum()

    gen = torch.Generator().manual_seed(8)
    inputs = [
        torch.randn(4, 6, 3, generator=gen).to(device).requires_grad_(),
        torch.randn(4, 6, generator=gen).to(device).requires_grad_(),
    ]
    eager = objective(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    torch.compile(objective, fullgraph=True, backend=capture)(*inputs)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fused_mtl.task_gram.default) == 2
    compiled = torch.compile(objective, fullgraph=True, backend=compiler)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
