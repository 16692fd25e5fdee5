"""The math of fused_mtl in plain torch: the CPU fallback, the eager baseline of the benchmarks.

Every formula here reads like its paper. Each function is vectorised over the task axis (no Python
loop over tasks), differentiable by autograd, and works in any floating dtype; half-precision
inputs are computed in float32 and the result is cast back, exactly like the Triton kernels do.

Uncertainty weighting
---------------------
For K tasks with scalar losses ``L_i`` and one learned parameter per task, the balanced total is
``sum_i term_i`` with three parametrisations:

- ``LOG_VARIANCE`` (Kendall, Gal & Cipolla, CVPR 2018), ``s_i = log sigma_i^2``::

      term_i = a_i * exp(-s_i) * L_i + b_i * s_i

  ``(a_i, b_i) = (1, 1)`` by default; ``(0.5, 0.5)`` for a regression task and ``(1, 0.5)`` for a
  classification task give the paper's exact terms.
- ``LIEBEL_KOERNER`` (Liebel & Koerner, 2018), parameter ``p_i = sigma_i``::

      term_i = 0.5 / p_i^2 * L_i + log(1 + p_i^2)

- ``DYNAMIC_NOISE`` (the Dynamic-Loss-Weighting form), parameter ``eta_i``::

      term_i = L_i / eta_i^2 + log(eta_i)

Per-task gradients
------------------
With ``g_i`` task i's gradient of the shared parameters (all of them, flattened and joined), the
Gram matrix is ``M_ik = <g_i, g_k>`` and the norms are ``||g_i|| = sqrt(M_ii)``. Gradients come
as one tensor ``(K, *param.shape)`` per shared parameter, so ``M = sum_j G_j G_j^T``.

GradNorm
--------
GradNorm (Chen et al., ICML 2018) learns task weights ``w`` from the gradient norms. With
``G_i = w_i ||g_i||``, ``G_mean = mean_i G_i``, training rates ``r_i = L~_i / mean_j L~_j``
where ``L~_i = L_i(t) / L_i(0)``, and the constant targets ``T_i = G_mean * r_i^alpha``, the
GradNorm loss ``sum_i |G_i - T_i|`` has the weight gradient ``sign(G_i - T_i) * ||g_i||``. A
task that trains slowly (``r_i > 1``) gets a target above the mean, and its weight grows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "TASK_TYPE_COEFFICIENTS",
    "Parametrization",
    "compute_dtype",
    "gradnorm_weight_grad",
    "renormalized_weights",
    "result_dtype",
    "task_grad_norms",
    "task_gram",
    "task_type_coefficients",
    "uncertainty_terms",
    "uncertainty_total",
    "uncertainty_weights",
]


class Parametrization(enum.IntEnum):
    """Which per-task parameter the uncertainty weighting learns (the kernels' constexpr)."""

    LOG_VARIANCE = 0
    LIEBEL_KOERNER = 1
    DYNAMIC_NOISE = 2


#: ``(a, b)`` of ``a * exp(-s) * L + b * s`` for each task type of Kendall et al.
TASK_TYPE_COEFFICIENTS: Mapping[str, tuple[float, float]] = {
    "regression": (0.5, 0.5),
    "classification": (1.0, 0.5),
}


def task_type_coefficients(
    task_types: Sequence[str], task_labels: Sequence[str]
) -> tuple[list[float], list[float]]:
    """Split task types into the lists of loss coefficients ``a_i`` and regulariser ``b_i``.

    ``task_labels`` only serves the error message (a name or an index per task).
    """
    loss_coefs, reg_coefs = [], []
    for label, task_type in zip(task_labels, task_types, strict=True):
        if task_type not in TASK_TYPE_COEFFICIENTS:
            raise ValueError(
                f"task {label}: unknown task type {task_type!r}; "
                f"expected one of {sorted(TASK_TYPE_COEFFICIENTS)}"
            )
        a, b = TASK_TYPE_COEFFICIENTS[task_type]
        loss_coefs.append(a)
        reg_coefs.append(b)
    return loss_coefs, reg_coefs


def result_dtype(losses: Tensor, params: Tensor) -> torch.dtype:
    """The dtype of the total: torch's promotion of the loss and parameter dtypes."""
    return torch.promote_types(losses.dtype, params.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32; float32 and float64 in themselves."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights_and_regularisers(
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-task weight ``w_i`` and regulariser ``r_i`` with ``term_i = w_i * L_i + r_i``."""
    if parametrization == Parametrization.LOG_VARIANCE:
        weights = torch.exp(-params)
        regularisers = params
        if loss_coefs is not None:
            weights = loss_coefs.to(params.dtype) * weights
        if reg_coefs is not None:
            regularisers = reg_coefs.to(params.dtype) * regularisers
    elif parametrization == Parametrization.LIEBEL_KOERNER:
        weights = 0.5 / params**2
        regularisers = torch.log(1 + params**2)
    elif parametrization == Parametrization.DYNAMIC_NOISE:
        weights = 1 / params**2
        regularisers = torch.log(params)
    else:
        raise ValueError(f"unknown parametrization {parametrization!r}")
    return weights, regularisers


def uncertainty_terms(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    reg_coefs: Tensor | None = None,
) -> Tensor:
    """Per-task terms ``w_i * L_i + r_i`` (shape ``(K,)``) in the compute dtype."""
    dtype = compute_dtype(result_dtype(losses, params))
    losses, params = losses.to(dtype), params.to(dtype)
    weights, regularisers = _weights_and_regularisers(
        params, parametrization, loss_coefs, reg_coefs
    )
    return weights * losses + regularisers


def uncertainty_total(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    reg_coefs: Tensor | None = None,
) -> Tensor:
    """The balanced total ``sum_i term_i`` (0-dim, in the promoted dtype of losses and params)."""
    terms = uncertainty_terms(losses, params, parametrization, loss_coefs, reg_coefs)
    return terms.sum().to(result_dtype(losses, params))


def uncertainty_weights(
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
) -> Tensor:
    """The effective weight ``w_i = dTotal / dL_i`` that multiplies each task loss."""
    weights, _ = _weights_and_regularisers(params, parametrization, loss_coefs, None)
    return weights


def _task_matrices(task_grads: Sequence[Tensor]) -> list[Tensor]:
    """Each ``(K, *param.shape)`` gradient as a ``(K, P_j)`` matrix in the compute dtype."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in task_grads) else torch.float32
    return [g.reshape(g.shape[0], -1).to(dtype) for g in task_grads]


def task_gram(task_grads: Sequence[Tensor]) -> Tensor:
    """``M = sum_j G_j G_j^T``, shape ``(K, K)``: float64 if any input is, else float32."""
    matrices = _task_matrices(task_grads)
    return torch.stack([m @ m.T for m in matrices]).sum(0)


def task_grad_norms(task_grads: Sequence[Tensor]) -> Tensor:
    """``||g_i||``, shape ``(K,)``: the square root of the Gram's diagonal, in its dtype."""
    matrices = _task_matrices(task_grads)
    # The norm of the per-parameter norms; vector_norm's gradient at a zero norm is zero.
    per_parameter = torch.stack([torch.linalg.vector_norm(m, dim=1) for m in matrices])
    return torch.linalg.vector_norm(per_parameter, dim=0)


def gradnorm_weight_grad(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """GradNorm's gradient for the task weights: ``sign(w_i ||g_i|| - T_i) * ||g_i||``."""
    weighted_norms = weights * grad_norms
    loss_ratios = losses / initial_losses
    training_rates = loss_ratios / loss_ratios.mean()
    # The target is a constant of the GradNorm loss: it carries no gradient of its own.
    targets = weighted_norms.mean() * training_rates**alpha
    return torch.sign(weighted_norms - targets) * grad_norms


def renormalized_weights(weights: Tensor, min_weight: float) -> Tensor:
    """Weights rescaled to sum to K, each first raised to at least ``min_weight`` (> 0)."""
    positive = weights.clamp_min(min_weight)
    return positive * (weights.shape[0] / positive.sum())
