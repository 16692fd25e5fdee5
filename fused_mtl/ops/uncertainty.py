"""Op layer of uncertainty weighting: backend dispatch, the autograd node and the registered ops.

The Triton path launches one kernel for the forward and one for the backward, through either of
two wrappers around the same launchers:

- in eager mode, a ``torch.autograd.Function``. A ``torch.library.custom_op`` with the same body
  costs about 48 us more per forward + backward in its Python dispatch (108 us vs 60 us on a
  2-core CPU, K = 2, measured with the reference math as the body), more than the two fused
  kernels themselves take on a GPU;
- under ``torch.compile``, the ops ``fused_mtl::uncertainty_weighting`` and its backward,
  registered with ``torch.library`` and tied with ``register_autograd``: Dynamo traces a call
  without a graph break (their fake kernels give it shapes) and keeps each as one node.

They are ``custom_op`` rather than ``triton_op``: registering a ``triton_op`` inspects its kernels
and so imports triton, while this module must import without triton (the kernels are imported
on the first Triton call). Each op is a single kernel already, so there is nothing for Inductor to
fuse inside it. Neither path synchronises with the host, so a step that uses them can be captured
in a CUDA graph.

The torch path calls ``fused_mtl.reference`` directly and autograd differentiates it. In eager
mode a backward with ``create_graph=True`` on the Triton path also goes through the reference, so
that second derivatives are right; under ``torch.compile`` double backward is not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl.ops.backend import Backend, resolve_backend
from fused_mtl.reference import Parametrization


def _launch_forward(losses, params, loss_coefs, reg_coefs, parametrization, lower, upper):
    from fused_mtl.kernels import uncertainty as kernels

    return kernels.uncertainty_forward(
        losses, params, loss_coefs, reg_coefs, parametrization, lower, upper
    )


def _launch_backward(
    grad_total, losses, params, loss_coefs, reg_coefs, parametrization, lower, upper
):
    from fused_mtl.kernels import uncertainty as kernels

    return kernels.uncertainty_backward(
        grad_total, losses, params, loss_coefs, reg_coefs, parametrization, lower, upper
    )


def _setup_context(ctx, inputs, output):
    """What both wrappers keep for the backward: the inputs, the (constexpr) parametrisation and
    the parameter's range."""
    losses, params, loss_coefs, reg_coefs, parametrization, lower, upper = inputs
    ctx.save_for_backward(losses, params, loss_coefs, reg_coefs)
    ctx.parametrization = parametrization
    ctx.bounds = (lower, upper)


# Every wrapper's backward returns no gradient for the coefficients and the configuration.
_NO_GRADIENTS = (None,) * 5


class _UncertaintyFunction(torch.autograd.Function):
    """Eager-mode autograd node of the Triton path (see the module docstring for why)."""

    @staticmethod
    def forward(ctx, losses, params, loss_coefs, reg_coefs, parametrization, lower, upper):
        inputs = (losses, params, loss_coefs, reg_coefs, parametrization, lower, upper)
        _setup_context(ctx, inputs, None)
        return _launch_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_total):
        losses, params, loss_coefs, reg_coefs = ctx.saved_tensors
        parametrization = Parametrization(ctx.parametrization)
        if torch.is_grad_enabled():
            # create_graph=True: the gradient itself will be differentiated (a gradient penalty,
            # a meta-learning step), so build it from differentiable torch ops, not the kernel.
            with torch.enable_grad():
                total = reference.total_in_parameter_range(
                    losses, params, parametrization, loss_coefs, reg_coefs, *ctx.bounds
                )
            grads = torch.autograd.grad(total, (losses, params), grad_total, create_graph=True)
            return *grads, *_NO_GRADIENTS
        grad_losses, grad_params = _launch_backward(
            grad_total, losses, params, loss_coefs, reg_coefs, ctx.parametrization, *ctx.bounds
        )
        return grad_losses, grad_params, *_NO_GRADIENTS


@torch.library.custom_op("fused_mtl::uncertainty_weighting", mutates_args=())
def _forward_op(
    losses: Tensor,
    params: Tensor,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
    parametrization: int,
    lower: float,
    upper: float,
) -> Tensor:
    return _launch_forward(losses, params, loss_coefs, reg_coefs, parametrization, lower, upper)


@_forward_op.register_fake
def _forward_fake(losses, params, loss_coefs, reg_coefs, parametrization, lower, upper):
    return losses.new_empty((), dtype=reference.result_dtype(losses, params))


@torch.library.custom_op("fused_mtl::uncertainty_weighting_backward", mutates_args=())
def _backward_op(
    grad_total: Tensor,
    losses: Tensor,
    params: Tensor,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
    parametrization: int,
    lower: float,
    upper: float,
) -> tuple[Tensor, Tensor]:
    return _launch_backward(
        grad_total, losses, params, loss_coefs, reg_coefs, parametrization, lower, upper
    )


@_backward_op.register_fake
def _backward_fake(grad_total, losses, params, loss_coefs, reg_coefs, parametrization, *bounds):
    return torch.empty_like(losses), torch.empty_like(params)


def _backward(ctx, grad_total):
    losses, params, loss_coefs, reg_coefs = ctx.saved_tensors
    grad_losses, grad_params = _backward_op(
        grad_total, losses, params, loss_coefs, reg_coefs, ctx.parametrization, *ctx.bounds
    )
    return grad_losses, grad_params, *_NO_GRADIENTS


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(losses: Tensor, params: Tensor, coefs: tuple[Tensor | None, ...]) -> None:
    if losses.dim() != 1 or params.dim() != 1 or losses.shape != params.shape:
        raise ValueError(
            f"losses and per-task parameters must both have shape (K,), "
            f"got {tuple(losses.shape)} and {tuple(params.shape)}"
        )
    if losses.numel() == 0:
        raise ValueError("at least one task is needed, got K = 0")
    for name, tensor in (("losses", losses), ("per-task parameters", params)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if losses.device != params.device:
        raise ValueError(
            f"losses are on {losses.device} but the per-task parameters on {params.device}; "
            "move them to the same device"
        )
    for coef in coefs:
        if coef is not None and (coef.shape != params.shape or coef.device != params.device):
            raise ValueError("task coefficients must have shape (K,) on the parameters' device")


def uncertainty_weighting(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    reg_coefs: Tensor | None = None,
    backend: Backend = "auto",
    log_var_bounds: tuple[float, float] = reference.LOG_VARIANCE_BOUNDS,
) -> Tensor:
    """Balanced total of a ``(K,)`` losses tensor; dispatches to Triton or the torch reference.

    ``backend`` is taken as requested: callers apply ``FUSED_MTL_BACKEND`` beforehand.
    ``log_var_bounds`` is the range of ``log sigma^2`` (see ``fused_mtl.reference``).
    """
    _check_inputs(losses, params, (loss_coefs, reg_coefs))
    return checked_uncertainty_weighting(
        losses, params, parametrization, loss_coefs, reg_coefs, backend, log_var_bounds
    )


def checked_uncertainty_weighting(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
    backend: Backend,
    log_var_bounds: tuple[float, float],
) -> Tensor:
    """``uncertainty_weighting`` for inputs whose shapes, dtypes and devices the caller has
    checked already (the modules: their losses come out of ``stack_losses``)."""
    if resolve_backend(backend, losses, params) == "torch":
        return reference.uncertainty_total(
            losses, params, parametrization, loss_coefs, reg_coefs, log_var_bounds
        )
    lower, upper = reference.parameter_bounds(parametrization, log_var_bounds)
    inputs = (losses, params, loss_coefs, reg_coefs, int(parametrization), lower, upper)
    if torch.compiler.is_compiling():
        return _forward_op(*inputs)
    return _UncertaintyFunction.apply(*inputs)
