"""Functional API: the balancing ops on tensors, without a module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl._backend import Backend, check_backend, requested_backend
from fused_mtl._losses import resolve_task_types
from fused_mtl._uncertainty_op import uncertainty_weighting as _uncertainty_op
from fused_mtl.reference import Parametrization

__all__ = ["uncertainty_weighting"]


def uncertainty_weighting(
    losses: Tensor,
    log_vars: Tensor,
    task_types: str | Sequence[str] | None = None,
    *,
    backend: Backend = "auto",
) -> Tensor:
    r"""Balanced total :math:`\sum_i a_i e^{-s_i} L_i + b_i s_i` of a ``(K,)`` losses tensor.

    ``log_vars`` holds ``s_i = log sigma_i^2`` (shape ``(K,)``). ``task_types`` selects
    ``(a_i, b_i)`` per task: ``"regression"`` (0.5, 0.5), ``"classification"`` (1, 0.5); ``None``
    gives (1, 1). The result has the promoted dtype of ``losses`` and ``log_vars``.

    ``UncertaintyWeighting`` keeps the task-type coefficients on the device; here they are built
    on each call from ``task_types``, a small host-to-device copy.

    Example:
        >>> import torch
        >>> from fused_mtl.functional import uncertainty_weighting
        >>> uncertainty_weighting(torch.tensor([1.0, 2.0]), torch.zeros(2))
        tensor(3.)
    """
    requested = requested_backend(check_backend(backend))
    loss_coefs = reg_coefs = None
    if task_types is not None and log_vars.dim() == 1:
        num_tasks = log_vars.shape[0]
        types = resolve_task_types(task_types, num_tasks, None)
        a, b = reference.task_type_coefficients(types, [str(i) for i in range(num_tasks)])
        loss_coefs = torch.tensor(a, device=log_vars.device)
        reg_coefs = torch.tensor(b, device=log_vars.device)
    return _uncertainty_op(
        losses, log_vars, Parametrization.LOG_VARIANCE, loss_coefs, reg_coefs, requested
    )
