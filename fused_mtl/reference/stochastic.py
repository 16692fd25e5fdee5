"""The stochastic gradient methods' math: MoCo, SDMGrad, MoDo and ExcessMTL.

These methods keep state across steps (tracked gradients, weights on the simplex, sums of
squared gradients) and are written for stochastic gradients: each step's update uses the
state as well as this step's per-task gradients. SDMGrad and MoDo work on inner products of
gradients only (a cross Gram matrix ``G_a G_b^T`` of two independent mini-batches, or the Gram
matrix of one); MoCo and ExcessMTL need the ``(K, P)`` gradients themselves.

Everything is vectorised over tasks, with no host synchronisation; the small ``(K,)`` and
``(K, K)`` problems are solved in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DB_MTL_EPSILON",
    "EXCESS_RISK_EPSILON",
    "db_mtl_update",
    "excess_mtl_weights",
    "excess_risks",
    "moco_lambdas",
    "moco_tracking",
    "modo_lambdas",
    "sdmgrad_lambdas",
    "sdmgrad_weights",
    "simplex_projection",
]

#: Added to the losses under DB-MTL's logarithm, as in the authors' code.
DB_MTL_EPSILON = 1e-8

#: Added to the sums of squared gradients under ExcessMTL's square root, as in the authors' code.
EXCESS_RISK_EPSILON = 1e-7


def simplex_projection(values: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``values`` onto the probability simplex
    (Duchi et al., 2008): ``max(v - theta, 0)`` with the one ``theta`` that makes it sum to 1.
    Sorting, no loop and no host read."""
    num = values.shape[-1]
    ordered = values.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, num + 1, dtype=values.dtype, device=values.device)
    # The entries kept are a prefix of the sorted ones: those above their threshold.
    kept = (ordered - cumulative / ranks > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(-1, kept - 1) / kept.to(values.dtype)
    return (values - theta).clamp_min(0)


def moco_tracking(tracked: Tensor, task_grads: Tensor, rate: float) -> Tensor:
    r"""MoCo's tracking of the task gradients, ``Y <- Y - beta_t (Y - G)``: an average of the
    stochastic gradients whose bias vanishes as ``beta_t`` does."""
    return tracked - rate * (tracked - task_grads.to(tracked.dtype))


def moco_lambdas(lambdas: Tensor, tracked_gram: Tensor, rate: float, rho: float) -> Tensor:
    r"""MoCo's weights (Fernando et al., ICLR 2023), one projected gradient step on
    ``(1/2) lambda^T (Y Y^T + rho I) lambda``:
    ``lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda)``."""
    gram = tracked_gram.detach().to(torch.float64)
    current = lambdas.to(torch.float64)
    step = gram @ current + rho * current
    return simplex_projection(current - rate * step).to(lambdas.dtype)


def modo_lambdas(lambdas: Tensor, cross_gram: Tensor, gamma: float, rho: float) -> Tensor:
    r"""MoDo's weights (Chen et al., NeurIPS 2023), with ``G_1 G_2^T`` the cross Gram matrix
    of two independent mini-batches' gradients:
    ``lambda <- Proj_simplex(lambda - gamma (G_1 G_2^T lambda + rho lambda))``."""
    gram = cross_gram.detach().to(torch.float64)
    current = lambdas.to(torch.float64)
    return simplex_projection(current - gamma * (gram @ current + rho * current)).to(lambdas.dtype)


def sdmgrad_lambdas(
    lambdas: Tensor,
    cross_gram: Tensor,
    lam: float,
    iterations: int,
    lr: float = 5.0,
    momentum: float = 0.5,
) -> Tensor:
    r"""SDMGrad's weights (Xiao et al., NeurIPS 2023): ``iterations`` projected steps, with
    heavy-ball momentum, on ``(1/2) w^T A w + lam <A 1/K, w>`` over the simplex, where
    ``A = G_1 G_2^T / s^2`` is the cross Gram matrix of two independent mini-batches scaled
    by ``s``, the mean gradient norm (so that ``lr`` does not depend on the gradients'
    scale), starting from the last step's ``w``. A zero ``s`` (every gradient zero) leaves
    ``A`` as it is: a guard added to ``s^2`` (1e-8 before) would make the weights depend on
    the scale of gradients near or below 1e-4."""
    gram = cross_gram.detach().to(torch.float64)
    diagonal = gram.diagonal().clamp_min(0)
    squared = diagonal.sqrt().mean().square()
    gram = gram / torch.where(squared > 0, squared, 1.0)
    pull = lam * gram.mean(dim=1)
    current = lambdas.to(torch.float64)
    velocity = torch.zeros_like(current)
    for iteration in range(iterations):
        gradient = gram @ current + pull
        # torch.optim.SGD's momentum: the first step's buffer is the gradient itself.
        velocity = gradient if iteration == 0 else momentum * velocity + gradient
        current = simplex_projection(current - lr * velocity)
    return current.to(lambdas.dtype)


def sdmgrad_weights(lambdas: Tensor, lam: float) -> Tensor:
    r"""SDMGrad's update ``d = (G^T w + lam g_0) / (1 + lam)``, ``g_0`` the mean gradient,
    as weights on the task gradients: ``(w + lam / K) / (1 + lam)``."""
    return (lambdas + lam / lambdas.shape[-1]) / (1 + lam)


def excess_risks(task_grads: Tensor, squared_sums: Tensor) -> tuple[Tensor, Tensor]:
    r"""ExcessMTL's excess-risk estimates (He et al., ICML 2024): with ``S_i`` the running sum
    of task i's squared gradients (AdaGrad's diagonal preconditioner ``H_i = sqrt(S_i)``),
    ``r_i = g_i^T H_i^{-1} g_i``; returns ``r`` and the updated ``S``."""
    squared = task_grads.to(squared_sums.dtype).square()
    sums = squared_sums + squared
    risks = (squared / (sums + EXCESS_RISK_EPSILON).sqrt()).sum(dim=-1)
    return risks, sums


def excess_mtl_weights(
    weights: Tensor, risks: Tensor, initial_risks: Tensor, step_size: float
) -> Tensor:
    r"""ExcessMTL's exponentiated-gradient step on the weights, with each risk relative to its
    first estimate: ``w_i <- w_i exp(eta r_i / r_i^0)``, rescaled to sum to K. A task without
    a first estimate yet (NaN, or 0) keeps a relative risk of 0."""
    known = initial_risks > 0  # False for NaN
    relative = torch.where(known, risks / torch.where(known, initial_risks, 1.0), 0.0)
    # The exponent is shifted by its largest value: the rescaling removes any common factor,
    # and a large step size cannot overflow.
    exponent = torch.log(weights) + step_size * relative
    updated = torch.exp(exponent - exponent.max(dim=-1, keepdim=True).values)
    return weights.shape[-1] * updated / updated.sum(dim=-1, keepdim=True)


def db_mtl_update(tracked: Tensor) -> Tensor:
    r"""DB-MTL's gradient balance (Lin et al., 2023): every tracked log-loss gradient
    rescaled to the largest one's norm, ``d = max_j ||y_j|| sum_i y_i / ||y_i||``; a zero
    ``y_i`` adds nothing (the authors' code divides by ``||y_i|| + 1e-8``, the same up to
    that term)."""
    norms = tracked.norm(dim=1)
    inverse = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
    return norms.max() * (inverse @ tracked)
