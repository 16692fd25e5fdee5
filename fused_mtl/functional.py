"""Functional API: the balancing ops on tensors, without a module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl._losses import resolve_task_types
from fused_mtl.ops.backend import Backend, check_backend, requested_backend
from fused_mtl.ops.gram import TaskGrads, task_gram_or_norms
from fused_mtl.ops.uncertainty import uncertainty_weighting as _uncertainty_op
from fused_mtl.reference import Parametrization, check_log_var_bounds

__all__ = ["task_grad_norms", "task_gram", "uncertainty_weighting"]


def uncertainty_weighting(
    losses: Tensor,
    log_vars: Tensor,
    task_types: str | Sequence[str] | None = None,
    *,
    backend: Backend = "auto",
    log_var_bounds: tuple[float, float] = reference.LOG_VARIANCE_BOUNDS,
) -> Tensor:
    r"""Balanced total :math:`\sum_i a_i e^{-s_i} L_i + b_i s_i` of a ``(K,)`` losses tensor.

    ``log_vars`` holds ``s_i = log sigma_i^2`` (shape ``(K,)``). ``task_types`` selects
    ``(a_i, b_i)`` per task: ``"regression"`` (0.5, 0.5), ``"classification"`` (1, 0.5); ``None``
    gives (1, 1). The result has the promoted dtype of ``losses`` and ``log_vars``.
    ``log_var_bounds`` is the range that ``s_i`` is kept in, as for ``UncertaintyWeighting``.

    ``UncertaintyWeighting`` keeps the task-type coefficients on the device; here they are built
    on each call from ``task_types``, a small host-to-device copy.

    Example:
        >>> import torch
        >>> from fused_mtl.functional import uncertainty_weighting
        >>> uncertainty_weighting(torch.tensor([1.0, 2.0]), torch.zeros(2))
        tensor(3.)
    """
    for name, value in (("losses", losses), ("log_vars", log_vars)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"uncertainty_weighting: {name} must be one tensor of shape (K,), got "
                f"{type(value).__name__}"
                + (" (torch.stack a list first)" if name == "losses" else "")
            )
    requested = requested_backend(check_backend(backend))
    bounds = check_log_var_bounds(log_var_bounds)
    loss_coefs = reg_coefs = None
    if task_types is not None and log_vars.dim() == 1:
        num_tasks = log_vars.shape[0]
        types = resolve_task_types(task_types, num_tasks, None)
        a, b = reference.task_type_coefficients(types, [str(i) for i in range(num_tasks)])
        loss_coefs = torch.tensor(a, device=log_vars.device)
        reg_coefs = torch.tensor(b, device=log_vars.device)
    return _uncertainty_op(
        losses, log_vars, Parametrization.LOG_VARIANCE, loss_coefs, reg_coefs, requested, bounds
    )


def task_grad_norms(task_grads: TaskGrads, *, backend: Backend = "auto") -> Tensor:
    r"""Per-task gradient norms :math:`\lVert g_i \rVert_2`, shape ``(K,)``.

    ``task_grads`` holds, for each shared parameter, the gradients of all K tasks stacked on a
    first axis: a sequence of tensors shaped ``(K, *param.shape)`` (what
    ``torch.autograd.grad(..., is_grads_batched=True)`` returns), or one ``(K, P)`` matrix.
    ``g_i`` is task i's gradient over all of them together. On CUDA one Triton launch reads every
    tensor (no concatenated copy) and a second sums the per-program partials in a fixed order,
    so the result is bitwise reproducible. The result is float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> from fused_mtl.functional import task_grad_norms
        >>> weight_grads = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])  # K = 2, weight (1, 2)
        >>> bias_grads = torch.tensor([[4.0], [0.0]])  # K = 2, bias (1,)
        >>> task_grad_norms([weight_grads, bias_grads])
        tensor([5., 1.])
    """
    return task_gram_or_norms(task_grads, True, requested_backend(check_backend(backend)))


def task_gram(task_grads: TaskGrads, *, backend: Backend = "auto") -> Tensor:
    r"""Gram matrix ``(K, K)`` of the per-task gradients, :math:`M_{ik} = \langle g_i, g_k \rangle`.

    Same input and dispatch rules as ``task_grad_norms``, whose result is ``sqrt(diag(M))``.
    The Triton path returns an exactly symmetric matrix. The Gram is float64 for gradients of
    every dtype: its entries are products of gradients, which float32 cannot hold for gradients
    below 1e-19 (they underflow to 0) or above 1.8e19 (inf); in float64 the product of two
    float32 numbers is exact. The Triton kernel multiplies and sums in float64; the torch path,
    on a CPU, keeps the float32 product when nothing in it can have left float32's range.

    Example:
        >>> import torch
        >>> from fused_mtl.functional import task_gram
        >>> task_gram(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        tensor([[ 5.,  1.],
                [ 1., 10.]], dtype=torch.float64)
        >>> task_gram(torch.tensor([[1e30, 0.0], [0.0, 1e-30]])).diagonal()
        tensor([1.0000e+60, 1.0000e-60], dtype=torch.float64)
    """
    return task_gram_or_norms(task_grads, False, requested_backend(check_backend(backend)))
