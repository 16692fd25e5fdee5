"""The loss-level methods' math: a total and weights from the loss values alone.

These methods need no per-task gradient. Each call's total is a function ``f(L)`` of the
``(K,)`` losses, and its gradient is ``sum_i w_i grad L_i`` with ``w_i = df / dL_i``; every
function here returns the weights in closed form (``value, weights`` where a method has its own
value). The methods then train ``f(L)`` through these weights (see ``LossObjective``), which
lets the weights come from the losses averaged over ranks under ``torch.distributed``. The
``*_gradient_weights`` functions are the same weights as differentiable functions of the
losses (no detach), whose derivatives are ``f``'s second derivatives: a backward with
``create_graph=True`` takes them.

Everything is computed in float32 at least (float64 stays float64) and vectorised over tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FAMO_EPSILON",
    "adam_step",
    "famo_gradient_weights",
    "famo_logit_gradient",
    "famo_weights",
    "geometric_mean",
    "geometric_mean_gradient_weights",
    "group_centroids",
    "penalty_boundary_intersection",
    "penalty_boundary_intersection_gradient_weights",
    "preference_cosine",
    "preference_cosine_gradient_weights",
    "random_weights",
    "risk_guided_indicators",
    "smooth_tchebycheff",
    "smooth_tchebycheff_gradient_weights",
    "soft_optimal_uncertainty_weights",
]

#: Added to ``L_i - L_i*`` before FAMO's logarithm, as in the authors' code.
FAMO_EPSILON = 1e-8


def _computed(losses: Tensor) -> Tensor:
    return losses.detach().to(torch.promote_types(losses.dtype, torch.float32))


def random_weights(draw: Tensor) -> Tensor:
    """RLW (Lin et al., 2022): ``softmax`` of a standard normal draw; the weights sum to 1."""
    return torch.softmax(draw.to(torch.promote_types(draw.dtype, torch.float32)), dim=-1)


def geometric_mean(losses: Tensor) -> tuple[Tensor, Tensor]:
    r"""GLS (Chennupati et al., 2019): ``(prod_i L_i)^(1/K)`` and its weights
    ``dG / dL_i = G / (K L_i)``.

    Computed as ``exp(mean(log L))``: a product of many small losses underflows long before
    its root does. A zero loss gives ``G = 0`` and weights 0 (the derivative there is
    unbounded, for K > 1); a negative one gives NaN, as its root is not real.
    """
    values = _computed(losses)
    num_tasks = values.shape[-1]
    mean = torch.exp(torch.log(values).mean(dim=-1))
    tiny = torch.finfo(values.dtype).tiny
    return mean, mean.unsqueeze(-1) / (num_tasks * values.clamp_min(tiny))


def geometric_mean_gradient_weights(losses: Tensor) -> Tensor:
    r"""GLS's weights ``G / (K L_i)`` as a function of the losses, differentiable: their
    derivatives are ``d^2 G / dL_i dL_j = G / (K^2 L_i L_j) - [i = j] G / (K L_i^2)``."""
    values = losses.to(torch.promote_types(losses.dtype, torch.float32))
    mean = torch.exp(torch.log(values).mean(dim=-1, keepdim=True))
    return mean / (values.shape[-1] * values.clamp_min(torch.finfo(values.dtype).tiny))


def smooth_tchebycheff(
    losses: Tensor, mu: float, ideal_point: Tensor, preferences: Tensor
) -> tuple[Tensor, Tensor]:
    r"""STCH (Lin et al., ICML 2024), the smooth Tchebycheff scalarisation:

    .. math:: g_\mu(L) = \mu \log \sum_i \exp\big(\lambda_i (L_i - z^*_i) / \mu\big),
              \qquad \frac{\partial g_\mu}{\partial L_i} = \lambda_i\,
              \mathrm{softmax}\big(\lambda (L - z^*) / \mu\big)_i .

    Shifted by the largest term before the division by ``mu``, it is finite for every finite
    input, whatever ``mu`` (a tiny ``mu`` would overflow ``lambda (L - z*) / mu`` itself).
    """
    values = _computed(losses)
    terms = preferences.to(values) * (values - ideal_point.to(values))
    largest = terms.max(dim=-1, keepdim=True).values
    scaled = (terms - largest) / mu
    value = largest.squeeze(-1) + mu * torch.logsumexp(scaled, dim=-1)
    return value, preferences.to(values) * torch.softmax(scaled, dim=-1)


def smooth_tchebycheff_gradient_weights(
    losses: Tensor, mu: float, ideal_point: Tensor, preferences: Tensor
) -> Tensor:
    r"""STCH's weights ``lambda_i softmax(lambda (L - z*) / mu)_i`` as a function of the
    losses, differentiable: their derivatives are ``d^2 g_mu / dL_i dL_j = lambda_i lambda_j
    (p_i [i = j] - p_i p_j) / mu`` with ``p`` the softmax. The shift by the largest term
    (constant: the softmax does not depend on it) keeps a tiny ``mu`` finite."""
    values = losses.to(torch.promote_types(losses.dtype, torch.float32))
    terms = preferences.to(values) * (values - ideal_point.to(values))
    largest = terms.detach().max(dim=-1, keepdim=True).values
    return preferences.to(values) * torch.softmax((terms - largest) / mu, dim=-1)


def famo_weights(logits: Tensor, losses: Tensor, min_losses: Tensor) -> Tensor:
    r"""FAMO (Liu et al., NeurIPS 2023): the weights of the update
    ``d = sum_i c z_i / (L_i - L_i^*) grad L_i``, ``z = softmax(xi)``,
    ``c = (sum_i z_i / (L_i - L_i^*))^{-1}``, which is the gradient of
    ``sum_i z_i log(L_i - L_i^*)`` scaled by ``c``; they sum to 1."""
    values = _computed(losses)
    shares = torch.softmax(logits.to(values), dim=-1)
    inverse = shares / (values - min_losses.to(values) + FAMO_EPSILON)
    return inverse / inverse.sum(dim=-1, keepdim=True)


def famo_gradient_weights(
    losses: Tensor, shares: Tensor, scale: Tensor, min_losses: Tensor
) -> Tensor:
    r"""FAMO's weights ``z_i / (c (L_i - L_i^* + 1e-8))`` as a function of the losses, with
    the shares ``z`` and ``c`` held at the call's values (``scale``, as the authors' code
    detaches it): the gradient of ``sum_i z_i log(L_i - L_i^* + 1e-8) / c``, differentiable,
    whose derivatives are ``-[i = j] z_i / (c (L_i - L_i^* + 1e-8)^2)``."""
    values = losses.to(torch.promote_types(losses.dtype, torch.float32))
    return shares.to(values) / (scale.to(values) * (values - min_losses.to(values) + FAMO_EPSILON))


def famo_logit_gradient(
    logits: Tensor, before: Tensor, after: Tensor, min_losses: Tensor
) -> Tensor:
    r"""FAMO's gradient of the logits, ``delta = J_z^T (log(L_t - L^*) - log(L_{t+1} - L^*))``
    with ``J_z`` the Jacobian of ``z = softmax(xi)``, which is ``z * (delta - <z, delta>)``.

    A descent step on it lowers the logit of the tasks whose log-loss fell the most: the
    weights move toward the task that improves the least.
    """
    before, after = _computed(before), _computed(after)
    floor = min_losses.to(before)
    decrease = torch.log(before - floor + FAMO_EPSILON) - torch.log(after - floor + FAMO_EPSILON)
    shares = torch.softmax(logits.to(before), dim=-1)
    return shares * (decrease - (shares * decrease).sum(dim=-1, keepdim=True))


def adam_step(
    parameter: Tensor,
    gradient: Tensor,
    first_moment: Tensor,
    second_moment: Tensor,
    step: Tensor,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of Adam (Kingma & Ba) with L2 weight decay added to the gradient, as
    ``torch.optim.Adam(weight_decay=...)``; ``step`` is the step's number (1 for the first),
    a tensor so that a compiled caller does not specialise on it. Returns the new parameter
    and moments."""
    beta1, beta2 = betas
    gradient = gradient + weight_decay * parameter
    first = beta1 * first_moment + (1 - beta1) * gradient
    second = beta2 * second_moment + (1 - beta2) * gradient.square()
    step = step.to(parameter.dtype)
    corrected_first = first / (1 - beta1**step)
    corrected_second = second / (1 - beta2**step)
    return parameter - lr * corrected_first / (corrected_second.sqrt() + eps), first, second


def _pbi_parts(values: Tensor, theta: float, preferences: Tensor, ideal_point: Tensor):
    """PBI's value and weights of ``values`` (differentiable when they are), computed in
    float64 (K numbers; float32's norm of losses near 1e20 would overflow)."""
    dtype, values = values.dtype, values.to(torch.float64)
    shifted = values - ideal_point.to(values)
    direction = preferences.to(values) / preferences.to(values).norm()
    along = (shifted * direction).sum(dim=-1, keepdim=True)
    perpendicular = shifted - along * direction
    distance = perpendicular.norm(dim=-1, keepdim=True)
    # On the preference ray the norm has no gradient: 0 is taken (the smallest subgradient)
    # rather than a NaN, or the direction of the rounding error of the losses (in their own
    # dtype: float32 losses on the ray are off it by their rounding) or of r - d_1 u, which is
    # all a distance within a few ulps of |r| is.
    off_ray = distance > 8 * torch.finfo(dtype).eps * shifted.norm(dim=-1, keepdim=True)
    unit = torch.where(off_ray, perpendicular / torch.where(off_ray, distance, 1.0), 0.0)
    value = (along + theta * distance).squeeze(-1)
    return value.to(dtype), (direction + theta * unit).to(dtype)


def penalty_boundary_intersection(
    losses: Tensor, theta: float, preferences: Tensor, ideal_point: Tensor
) -> tuple[Tensor, Tensor]:
    r"""PBI (Zhang & Li, MOEA/D, 2007), the penalty-based boundary intersection: with the
    unit preference direction ``u = lambda / ||lambda||`` and ``r = L - z*``,

    .. math:: d_1 = \langle r, u\rangle, \qquad d_2 = \|r - d_1 u\|, \qquad
              f = d_1 + \theta d_2, \qquad \frac{\partial f}{\partial L} = u + \theta
              \frac{r - d_1 u}{d_2}.

    ``d_1`` is the progress along the preference ray, ``d_2`` the distance to it. On the ray
    (``d_2 = 0``) the weights are ``u``."""
    return _pbi_parts(_computed(losses), theta, preferences, ideal_point)


def penalty_boundary_intersection_gradient_weights(
    losses: Tensor, theta: float, preferences: Tensor, ideal_point: Tensor
) -> Tensor:
    """PBI's weights ``u + theta (r - d_1 u) / d_2`` as a function of the losses,
    differentiable: their derivatives are ``theta (I - u u^T - e e^T) / d_2`` with ``e`` the
    unit vector from the ray to ``r``."""
    values = losses.to(torch.promote_types(losses.dtype, torch.float32))
    return _pbi_parts(values, theta, preferences, ideal_point)[1]


def _cosine_parts(values: Tensor, penalty: float, preferences: Tensor):
    """COSMOS's value and weights of ``values`` (differentiable when they are), computed in
    float64 (float32's norm of losses near 1e20 would overflow)."""
    dtype, values = values.dtype, values.to(torch.float64)
    preferences = preferences.to(values)
    linear = (preferences * values).sum(dim=-1, keepdim=True)
    length = values.norm(dim=-1, keepdim=True)
    scale = preferences.norm() * length
    positive = scale > 0
    safe_scale = torch.where(positive, scale, 1.0)
    safe_length = torch.where(positive, length, 1.0)
    cosine = torch.where(positive, linear / safe_scale, 0.0)
    # d cos / dL = lambda / (||lambda|| ||L||) - cos L / ||L||^2; 0 where every loss is 0.
    cosine_gradient = torch.where(
        positive, preferences / safe_scale - cosine * values / safe_length.square(), 0.0
    )
    value = (linear - penalty * cosine).squeeze(-1)
    return value.to(dtype), (preferences - penalty * cosine_gradient).to(dtype)


def preference_cosine(losses: Tensor, penalty: float, preferences: Tensor) -> tuple[Tensor, Tensor]:
    r"""COSMOS (Ruchte & Grabocka, ICDM 2021): the linear scalarisation minus a reward for
    losses aligned with the preference vector,

    .. math:: f = \langle\lambda, L\rangle - \mu \cos(\lambda, L), \qquad
              \frac{\partial f}{\partial L} = \lambda - \mu\Big(\frac{\lambda}
              {\|\lambda\|\,\|L\|} - \cos(\lambda, L) \frac{L}{\|L\|^2}\Big).

    Where every loss is 0 the cosine is taken as 0, and so is its gradient."""
    return _cosine_parts(_computed(losses), penalty, preferences)


def preference_cosine_gradient_weights(
    losses: Tensor, penalty: float, preferences: Tensor
) -> Tensor:
    """COSMOS's weights as a function of the losses, differentiable (their derivatives are
    ``-mu`` times the Hessian of the cosine)."""
    values = losses.to(torch.promote_types(losses.dtype, torch.float32))
    return _cosine_parts(values, penalty, preferences)[1]


def soft_optimal_uncertainty_weights(losses: Tensor, temperature: float) -> Tensor:
    r"""UW-SO (Kirchdorfer et al., GCPR 2024): uncertainty weighting's optimal weight of each
    task, ``1 / L_i`` (the ``sigma_i^2`` that minimises ``L_i / sigma_i^2 + log sigma_i^2`` is
    ``L_i``), normalised by a softmax of temperature ``T``:
    ``w_i = softmax(1 / (T L_i))``; they sum to 1.

    A loss at or below the smallest normal number counts as that number: ``1 / L`` stays
    finite, and the softmax, shifted by its largest term, too."""
    values = _computed(losses)
    # In float64, shifted by the smallest loss's term: (1/L - 1/L_min) / T <= 0, so neither a
    # tiny loss nor a tiny T overflows, and the smallest loss keeps the largest weight.
    inverse = 1 / values.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    shifted = (inverse - inverse.max(dim=-1, keepdim=True).values) / temperature
    return torch.softmax(shifted, dim=-1).to(values.dtype)


def risk_guided_indicators(losses: Tensor, alignment: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    r"""GO4Align (Shen et al., NeurIPS 2024), Eqs. 5-7: the scale balance ``p_i = mean(L) /
    L_i`` and the smooth alignment ``q <- q exp(-beta L) / sum_j q_j exp(-beta L_j)`` (a
    softmax of ``-beta`` times each task's cumulative loss); returns the indicators ``gamma =
    p q`` and the new ``q``."""
    values = _computed(losses)
    previous = alignment.to(values)
    # log q - beta L, shifted by its largest term: q's tiny entries do not underflow to 0/0.
    logits = torch.log(previous) - beta * values
    updated = torch.softmax(logits, dim=-1)
    mean = values.mean(dim=-1, keepdim=True)
    # p_i is unbounded as L_i -> 0: a loss below eps times the mean counts as that (p at most
    # 1 / eps), and all-zero losses have p = 1.
    floor = values.clamp_min(mean * torch.finfo(values.dtype).eps)
    scale = torch.where(mean > 0, mean / torch.where(mean > 0, floor, 1.0), 1.0)
    return scale * updated, updated


def group_centroids(values: Tensor, groups: int) -> Tensor:
    r"""The exact K-means of the ``(M,)`` numbers ``values`` into ``min(groups, M)`` groups
    (the least total squared distance to the groups' means), each value replaced by its
    group's mean: GO4Align's inner problem (Eqs. 3-4). In one dimension the optimal groups are
    runs of the sorted values, found by dynamic programming over their boundaries (no random
    start, unlike Lloyd's iterations); ties go to the earliest boundary."""
    dtype = values.dtype
    ordered, order = values.to(torch.float64).sort()
    count = ordered.shape[0]
    groups = min(groups, count)
    zero = ordered.new_zeros(1)
    sums = torch.cat([zero, ordered.cumsum(0)])
    squares = torch.cat([zero, ordered.square().cumsum(0)])
    index = torch.arange(count, device=values.device)
    start, end = index[:, None], index[None, :]  # a run from start to end, inclusive
    size = (end - start + 1).clamp_min(1).to(ordered.dtype)
    run_sum = sums[end + 1] - sums[start]
    cost = squares[end + 1] - squares[start] - run_sum.square() / size
    cost = torch.where(start <= end, cost.clamp_min(0), torch.inf)
    best = cost[0]  # one group: the run from the first value
    starts = []
    for group in range(1, groups):
        before = torch.cat([best.new_full((1,), torch.inf), best[:-1]])  # ends at start - 1
        candidates = torch.where(start >= group, before[:, None] + cost, torch.inf)
        best, first = candidates.min(dim=0)
        starts.append(first)
    # From the last value back, each group's run and its mean.
    centroids = ordered.clone()
    last = index[-1]
    for group in range(groups - 1, -1, -1):
        first = starts[group - 1][last] if group > 0 else index[0]
        mean = (sums[last + 1] - sums[first]) / (last - first + 1).to(ordered.dtype)
        centroids = torch.where((index >= first) & (index <= last), mean, centroids)
        last = first - 1
    return torch.empty_like(centroids).scatter_(0, order, centroids).to(dtype)
