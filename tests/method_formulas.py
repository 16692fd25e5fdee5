"""float64 references of the loss-level and stochastic methods, from each paper's equations.

Written from the papers' formulas with autograd, ``torch.optim`` and loops over tasks, and
importing nothing from fused_mtl: the simplex projection is a bisection on the threshold (the
package sorts), FAMO's logit step is ``torch.optim.Adam`` and SDMGrad's inner loop
``torch.optim.SGD`` (the package writes both steps out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

F64 = torch.float64


def simplex_projection(v: Tensor) -> Tensor:
    """argmin_{x in simplex} ||x - v||: x = max(v - theta, 0), theta found by bisection."""
    v = v.to(F64)
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        middle = (low + high) / 2
        if (v - middle).clamp_min(0).sum() > 1:
            low = middle
        else:
            high = middle
    return (v - (low + high) / 2).clamp_min(0)


def value_and_gradient(objective: Callable[[Tensor], Tensor], losses: Tensor):
    """``f(L)`` and ``df/dL`` by autograd in float64."""
    point = losses.detach().to(F64).requires_grad_()
    value = objective(point)
    (gradient,) = torch.autograd.grad(value, point)
    return value.detach(), gradient


def geometric_mean(L: Tensor) -> Tensor:
    """GLS: (prod_i L_i)^(1/K)."""
    return torch.prod(L) ** (1.0 / L.numel())


def smooth_tchebycheff(mu: float, ideal: Tensor, preferences: Tensor):
    """STCH: mu log sum_i exp(lambda_i (L_i - z*_i) / mu)."""
    return lambda L: mu * torch.log(torch.sum(torch.exp(preferences * (L - ideal) / mu)))


def imtl_l(L: Tensor, s: Tensor) -> Tensor:
    """IMTL-L: sum_i e^{s_i} L_i - s_i."""
    return torch.sum(torch.exp(s) * L - s)


def random_weights(draw: Tensor) -> Tensor:
    """RLW: softmax of the normal draw."""
    e = torch.exp(draw.to(F64))
    return e / e.sum()


def famo(
    steps: Sequence[tuple[Tensor, Tensor]], lr: float, gamma: float, min_losses: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """FAMO's loop (Algorithm 1, with the authors' Adam on the logits): for each step's
    losses before and after the model's update, the weights the step trains with (the
    gradient of sum_i z_i log(L_i - L*_i + 1e-8) / c, c = sum_i z_i / (L_i - L*_i + 1e-8),
    at the losses before), then the logits after it, as (weights, softmax(logits))."""
    K = min_losses.numel()
    logits = torch.zeros(K, dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr, weight_decay=gamma)
    record = []
    for before, after in steps:
        z = torch.softmax(logits, 0).detach()
        before = before.to(F64)
        c = (z / (before - min_losses + 1e-8)).sum()
        weights = value_and_gradient(
            lambda L, z=z, c=c: (z * torch.log(L - min_losses + 1e-8)).sum() / c, before
        )[1]
        delta = torch.log(before - min_losses + 1e-8) - torch.log(after.to(F64) - min_losses + 1e-8)
        (gradient,) = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)
        optimizer.zero_grad()
        logits.grad = gradient
        optimizer.step()
        record.append((weights, torch.softmax(logits, 0).detach()))
    return record


def moco(
    jacobians: Sequence[Tensor],
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> list[tuple[Tensor, Tensor]]:
    """MoCo (Fernando et al., Algorithm 1): per step t, with the step's K x P gradients J,
    Y <- Y - beta_t (Y - J); lambda <- Proj(lambda - gamma_t (Y Y^T + rho I) lambda);
    d = Y^T lambda. Returns (d, lambda) per step."""
    K, P = jacobians[0].shape
    Y = torch.zeros(K, P, dtype=F64)
    lam = torch.full((K,), 1.0 / K, dtype=F64)
    out = []
    for t, J in enumerate(jacobians, start=1):
        Y = Y - beta / t**beta_sigma * (Y - J.to(F64))
        step = (Y @ Y.T + rho * torch.eye(K, dtype=F64)) @ lam
        lam = simplex_projection(lam - gamma / t**gamma_sigma * step)
        out.append((Y.T @ lam, lam))
    return out


def sdmgrad(
    J_update: Tensor, J_a: Tensor, J_b: Tensor, w: Tensor, lam: float = 0.3, niter: int = 20
) -> tuple[Tensor, Tensor, Tensor]:
    """SDMGrad (Xiao et al.), as the authors' code runs it: ``niter`` SGD steps (lr 5,
    momentum 0.5) on (1/2) w^T A w + lam <A 1/K, w>, A = J_a J_b^T / (mean_i ||g_i||)^2, each
    followed by the simplex projection; d = (J^T w + lam mean_i g_i) / (1 + lam). Returns
    (d, the weights of d on J's rows, w)."""
    A = J_a.to(F64) @ J_b.to(F64).T
    scale = A.diagonal().clamp_min(0).sqrt().mean()
    # The authors' code adds 1e-8 to scale^2, a guard against 0 that makes the weights depend
    # on the scale of gradients near 1e-4 and below; the guard here is at 0 only, so that the
    # weights do not depend on the gradients' scale, as the method's normalisation intends.
    A = A / torch.where(scale > 0, scale**2, 1.0)
    K = A.shape[0]
    weights = w.to(F64).clone().requires_grad_()
    optimizer = torch.optim.SGD([weights], lr=5.0, momentum=0.5)
    for _ in range(niter):
        optimizer.zero_grad()
        weights.grad = A @ weights.detach() + lam * A @ torch.full((K,), 1.0 / K, dtype=F64)
        optimizer.step()
        with torch.no_grad():
            weights.copy_(simplex_projection(weights))
    w = weights.detach()
    J = J_update.to(F64)
    d = (J.T @ w + lam * J.mean(0)) / (1 + lam)
    return d, (w + lam / K) / (1 + lam), w


def modo(
    J_update: Tensor, J_a: Tensor, J_b: Tensor, lam: Tensor, gamma: float, rho: float
) -> tuple[Tensor, Tensor]:
    """MoDo (Chen et al.): lambda <- Proj(lambda - gamma (J_a J_b^T lambda + rho lambda));
    d = J^T lambda. Returns (d, lambda)."""
    lam = lam.to(F64)
    lam = simplex_projection(lam - gamma * (J_a.to(F64) @ (J_b.to(F64).T @ lam) + rho * lam))
    return J_update.to(F64).T @ lam, lam


def excess_mtl(jacobians: Sequence[Tensor], step_size: float = 1e-2) -> list[Tensor]:
    """ExcessMTL (He et al.): per task, S_i += g_i^2 (per coordinate), r_i = sum_p g_ip^2 /
    sqrt(S_ip + 1e-7); the first step records r^0; afterwards w_i <- w_i exp(eta r_i /
    r^0_i) and w <- K w / sum w. Returns the weights each step trains with."""
    K, P = jacobians[0].shape
    S = torch.zeros(K, P, dtype=F64)
    w = torch.ones(K, dtype=F64)
    first = None
    out = []
    for J in jacobians:
        J = J.to(F64)
        risks = torch.zeros(K, dtype=F64)
        for i in range(K):
            S[i] += J[i] ** 2
            risks[i] = (J[i] ** 2 / torch.sqrt(S[i] + 1e-7)).sum()
        if first is None:
            first = risks.clone()
        else:
            w = w * torch.exp(step_size * risks / first)
            w = K * w / w.sum()
        out.append(w.clone())
    return out


def penalty_boundary_intersection(theta: float, preferences: Tensor, ideal: Tensor):
    """PBI (MOEA/D): d1 = <L - z*, u>, d2 = ||L - z* - d1 u||, f = d1 + theta d2 with
    u = lambda / ||lambda||."""

    def objective(L: Tensor) -> Tensor:
        u = preferences / torch.sqrt(torch.sum(preferences**2))
        d1 = torch.sum((L - ideal) * u)
        d2 = torch.sqrt(torch.sum((L - ideal - d1 * u) ** 2))
        return d1 + theta * d2

    return objective


def cosmos(mu: float, preferences: Tensor):
    """COSMOS: sum_i lambda_i L_i - mu cos(lambda, L)."""

    def objective(L: Tensor) -> Tensor:
        linear = torch.sum(preferences * L)
        cosine = linear / (torch.sqrt(torch.sum(preferences**2)) * torch.sqrt(torch.sum(L**2)))
        return linear - mu * cosine

    return objective


def uw_so_weights(L: Tensor, temperature: float) -> Tensor:
    """UW-SO: w_i = exp(1 / (T L_i)) / sum_j exp(1 / (T L_j))."""
    e = torch.exp(1 / (temperature * L.detach().to(F64)))
    return e / e.sum()


def db_mtl(
    log_jacobians: Sequence[Tensor], beta: float = 0.9, beta_sigma: float = 0.5
) -> list[Tensor]:
    """DB-MTL (Lin et al.): per step t and task i, y_i <- b_t y_i + (1 - b_t) grad log L_i with
    b_t = beta / t^beta_sigma, from y = 0; the update is max_j ||y_j|| sum_i y_i / ||y_i||.
    ``log_jacobians``: each step's K x P gradients of the log-losses. Returns the updates."""
    K, P = log_jacobians[0].shape
    y = torch.zeros(K, P, dtype=F64)
    out = []
    for t, J in enumerate(log_jacobians, start=1):
        b = beta / t**beta_sigma
        y = b * y + (1 - b) * J.to(F64)
        norms = [float(torch.sqrt(torch.sum(y[i] ** 2))) for i in range(K)]
        largest = max(norms)
        out.append(sum(largest * y[i] / norms[i] for i in range(K) if norms[i] > 0))
    return out


def go4align(loss_history: Sequence[Tensor], groups: int, beta: float) -> Tensor:
    """GO4Align (Shen et al.): per step q <- q e^{-beta L} / sum(q e^{-beta L}) from q = 1/M,
    p = mean(L)/L, gamma = p q; the weights of the last step: each task's group centre for the
    K-means of gamma into ``groups`` groups, by trying every assignment."""
    import itertools

    M = loss_history[0].numel()
    q = torch.full((M,), 1 / M, dtype=F64)
    for L in loss_history:
        L = L.to(F64)
        q = q * torch.exp(-beta * L)
        q = q / q.sum()
    gamma = (L.mean() / L) * q
    best, best_cost = None, math.inf
    for labels in itertools.product(range(min(groups, M)), repeat=M):
        if len(set(labels)) < min(groups, M):
            continue
        centres = {g: gamma[[i for i in range(M) if labels[i] == g]].mean() for g in set(labels)}
        cost = sum(float((gamma[i] - centres[labels[i]]) ** 2) for i in range(M))
        if cost < best_cost - 1e-18:
            best, best_cost = torch.stack([centres[g] for g in labels]), cost
    return best
