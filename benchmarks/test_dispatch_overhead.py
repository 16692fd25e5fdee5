"""Python dispatch cost of the two ways to wrap a fused op: ``torch.library.custom_op`` with
``register_autograd`` vs a plain ``torch.autograd.Function``, around the same torch body.

The body is the reference math at K = 2 (a few microseconds), so the difference between the two
rows is the wrapper. This is why fused_mtl's eager Triton path uses an autograd.Function and
keeps the registered op for torch.compile (see fused_mtl/ops/uncertainty.py).
"""

import pytest
import torch
from torch import Tensor

from fused_mtl.app.benchmark_cases import environment


def _forward(losses: Tensor, params: Tensor) -> Tensor:
    return (torch.exp(-params) * losses + params).sum()


def _backward(grad: Tensor, losses: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    weights = torch.exp(-params)
    return grad * weights, grad * (1 - weights * losses)


@torch.library.custom_op("fused_mtl_bench::probe_forward", mutates_args=())
def _probe_op(losses: Tensor, params: Tensor) -> Tensor:
    return _forward(losses, params)


@_probe_op.register_fake
def _(losses, params):
    return losses.new_empty(())


@torch.library.custom_op("fused_mtl_bench::probe_backward", mutates_args=())
def _probe_backward_op(grad: Tensor, losses: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    return _backward(grad, losses, params)


@_probe_backward_op.register_fake
def _(grad, losses, params):
    return torch.empty_like(losses), torch.empty_like(params)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_probe_op.register_autograd(
    lambda ctx, grad: _probe_backward_op(grad, *ctx.saved_tensors), setup_context=_setup_context
)


class _ProbeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, losses, params):
        ctx.save_for_backward(losses, params)
        return _forward(losses, params)

    @staticmethod
    def backward(ctx, grad):
        return _backward(grad, *ctx.saved_tensors)


@pytest.mark.parametrize(
    "wrapper", [_probe_op, _ProbeFunction.apply], ids=["custom_op", "autograd_function"]
)
def test_wrapper_forward_backward(benchmark, request, wrapper):
    benchmark.group = "dispatch overhead, fwd+bwd, K=2, CPU"
    benchmark.extra_info.update(
        environment("cpu"), implementation=request.node.callspec.id, baseline="autograd_function"
    )
    losses = torch.rand(2, requires_grad=True)
    params = torch.zeros(2, requires_grad=True)

    def step():
        wrapper(losses, params).backward()

    for _ in range(100):  # warm-up: the first calls of a custom op build its dispatch caches
        step()
    benchmark(step)
