"""Solvers on the Gram matrix of the task gradients.

MGDA
----
MGDA (Sener & Koltun, NeurIPS 2018) takes the point of the convex hull of the task gradients
with the smallest norm: ``alpha = argmin_{alpha in simplex} ||sum_i alpha_i g_i||^2``, which needs
only the Gram matrix ``M``: the objective is ``alpha^T M alpha``. The gradients may first be
normalised, ``g_i / c_i``, which turns ``M`` into ``M_ik / (c_i c_k)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_mtl.reference.gram import unit_scale

#: How MGDA may normalise task gradients before taking the min-norm point: ``g_i / c_i``.
MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def gradient_scales(gram: Tensor, losses: Tensor, normalization: str) -> Tensor:
    """The ``c_i`` of a normalisation: 1, ``||g_i||``, ``L_i`` or ``L_i ||g_i||``.

    A zero gradient keeps a scale of 1 under ``"l2"``/``"loss+"``, so that its row of the
    normalised Gram stays 0 instead of 0 / 0.
    """
    if normalization not in MGDA_NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {MGDA_NORMALIZATIONS}, got {normalization!r}"
        )
    if normalization == "none":
        return torch.ones_like(gram.diagonal())
    losses = losses.to(gram.dtype)
    if normalization == "loss":
        return losses
    norms = gram.diagonal().clamp_min(0).sqrt()
    norms = torch.where(norms > 0, norms, 1.0)
    return norms if normalization == "l2" else losses * norms


#: Up to this many tasks the min-norm problem is solved exactly by enumerating its 2^K - 1 faces
#: in one batched solve: at K = 10, 1023 systems of size 11 take 1.7 ms on 2 CPU cores.
ENUMERATION_MAX_TASKS = 10

#: Interior-point iterations beyond ``ENUMERATION_MAX_TASKS``: on random, ill-conditioned
#: (singular values 1 to 1e-8), rank-deficient, duplicated and opposed task gradients with
#: K = 11 to 64, 20 iterations reach a Frank-Wolfe gap below 3e-15 of the largest squared norm
#: (15 leave 6e-12); 30 leave a margin.
INTERIOR_POINT_ITERATIONS = 30

# An iterate whose Frank-Wolfe gap is below this (the Gram scaled to a largest diagonal of 1)
# is kept as it is: further Newton steps only drive the inactive weights and their multipliers
# towards 0 / 0.
_CONVERGED_GAP = 1e-15
# Fraction of the step to the boundary of the positive orthant (Mehrotra's usual 0.995).
_STEP_TO_BOUNDARY = 0.995
# Supports tried by the final polish: the tasks whose weight exceeds these fractions of the
# largest weight (the interior point leaves 1e-30 or less on tasks outside the optimal face).
_POLISH_THRESHOLDS = (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)


def min_norm_weights(gram: Tensor, iterations: int = INTERIOR_POINT_ITERATIONS) -> Tensor:
    """``argmin_{alpha in simplex} alpha^T M alpha`` for a ``(K, K)`` Gram matrix ``M``.

    - K = 1: 1. K = 2: the closed form ``alpha_1 = clip((M_22 - M_12) / ||g_1 - g_2||^2, 0, 1)``
      (1/2 when ``g_1 = g_2``).
    - K <= ``ENUMERATION_MAX_TASKS``: exact. On each face S of the simplex the minimum over
      the face's affine hull solves ``M_SS alpha_S = mu 1, sum alpha_S = 1``; the best of these
      points, each clipped onto the simplex, is the optimum.
    - Larger K: ``iterations`` steps of Mehrotra's predictor-corrector interior-point method on
      the KKT conditions ``M alpha = mu 1 + lambda``, ``1^T alpha = 1``, ``alpha_i lambda_i = 0``,
      ``alpha, lambda >= 0`` (one LU factorisation of a ``(K + 1)`` system and two solves per
      step), then a polish: the exact minimum of the faces spanned by the tasks that kept a
      weight (see ``_POLISH_THRESHOLDS``), kept when it is better, which puts exact zeros on
      the other tasks. Newton steps converge whatever the conditioning, where first-order
      methods crawl: 250 pairwise Frank-Wolfe steps left the objective up to 180x the optimum
      at K = 11 with singular values 1 to 1e-4. When the optimal weights are not unique (a
      rank-deficient Gram) the interior point tends to the centre of the optimal set, which
      treats tasks with equal gradients alike.

    Precision, in float64: the Frank-Wolfe duality gap ``2 (alpha^T M alpha - min_i (M alpha)_i)``,
    an upper bound on the distance to the optimum, is below 1e-8 of the largest diagonal entry
    ``max_i M_ii`` for every K up to 64 on the problems of ``tests/test_solver_properties.py``
    (random, ill-conditioned to singular values 1e-8, rank-deficient, duplicated, opposed,
    norms over 24 decades); measured worst cases are in that file.

    Every path is a fixed sequence of tensor operations: it runs on the device without a host
    synchronisation. The work is done in float64 and the weights returned in the Gram's dtype:
    the face systems of an ill-conditioned Gram lose about cond(M) x 1e-7 in float32, and
    K x K numbers cost nothing to upcast.
    """
    if gram.dtype != torch.float64:
        return min_norm_weights(gram.double(), iterations).to(gram.dtype)
    # alpha is invariant to the scale of M: the solvers see a largest diagonal in [1, 2) (a
    # power-of-two division, exact) whether the gradients are 1e-30 or 1e30.
    gram = gram / unit_scale(gram)
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return torch.ones_like(gram[0])
    if num_tasks == 2:
        (m11, m12), (_, m22) = gram
        distance = m11 + m22 - 2 * m12
        first = torch.where(distance > 0, (m22 - m12) / distance, 0.5).clamp(0, 1)
        return torch.stack([first, 1 - first])
    if num_tasks <= ENUMERATION_MAX_TASKS:
        return _enumerated(gram)
    return _interior_point(gram, iterations)


def _largest_step(values: Tensor, steps: Tensor) -> Tensor:
    """The largest ``t`` in [0, 1] with ``values + t * steps >= 0`` (``values > 0``)."""
    ratios = torch.where(steps < 0, -values / steps, torch.inf)
    return ratios.min().clamp(max=1.0)


def _newton_step(
    factors: Tensor,
    pivots: Tensor,
    dual_residual: Tensor,
    primal_residual: Tensor,
    alpha: Tensor,
    multipliers: Tensor,
    products: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One solve of the interior point's Newton system for the complementarity target
    ``products`` (``alpha_i lambda_i`` after the step, to first order): the steps of ``alpha``,
    ``mu`` and ``lambda``."""
    num_tasks = alpha.shape[0]
    rhs = torch.cat([-dual_residual - products / alpha, -primal_residual])
    solution = torch.linalg.lu_solve(factors, pivots, rhs[:, None])[:, 0]
    step_alpha = solution[:num_tasks]
    step_multipliers = (-products - multipliers * step_alpha) / alpha
    return step_alpha, solution[num_tasks], step_multipliers


def _interior_point(gram: Tensor, iterations: int) -> Tensor:
    """Mehrotra's predictor-corrector on the min-norm KKT conditions, then the polish."""
    num_tasks = gram.shape[0]
    # alpha is invariant to the scale of M; a largest diagonal of 1 makes the tolerances
    # absolute. An all-zero Gram (every gradient zero) keeps the uniform point.
    scale = gram.diagonal().max()
    scaled = gram / torch.where(scale > 0, scale, 1.0)
    scaled = (scaled + scaled.T) / 2
    alpha = torch.full_like(scaled[0], 1 / num_tasks)
    multipliers = torch.ones_like(alpha)  # lambda
    level = torch.zeros_like(scale)  # mu
    ones = torch.ones_like(alpha)
    border = torch.cat([ones, torch.zeros_like(ones[:1])])[None, :]
    for _ in range(iterations):
        slopes = scaled @ alpha
        dual_residual = slopes - level - multipliers
        primal_residual = alpha.sum(dim=0, keepdim=True) - 1
        complementarity = alpha @ multipliers / num_tasks
        # Newton's system with the multipliers eliminated:
        # [M + diag(lambda / alpha), -1; 1^T, 0] [d alpha; d mu] = rhs.
        system = torch.cat(
            [torch.cat([scaled + torch.diag(multipliers / alpha), -ones[:, None]], dim=1), border]
        )
        factors, pivots, _ = torch.linalg.lu_factor_ex(system)
        newton = (factors, pivots, dual_residual, primal_residual, alpha, multipliers)

        # Predictor: the affine-scaling step; its progress sets the centring (sigma).
        affine_alpha, _, affine_multipliers = _newton_step(*newton, alpha * multipliers)
        reach_alpha = _largest_step(alpha, affine_alpha)
        reach_multipliers = _largest_step(multipliers, affine_multipliers)
        affine_complementarity = (
            (alpha + reach_alpha * affine_alpha)
            @ (multipliers + reach_multipliers * affine_multipliers)
            / num_tasks
        )
        ratio = affine_complementarity / complementarity.clamp_min(torch.finfo(gram.dtype).tiny)
        centring = ratio.clamp(0, 1) ** 3
        # Corrector: second-order term and centring.
        step_alpha, step_level, step_multipliers = _newton_step(
            *newton,
            alpha * multipliers + affine_alpha * affine_multipliers - centring * complementarity,
        )
        reach_alpha = _STEP_TO_BOUNDARY * _largest_step(alpha, step_alpha)
        reach_multipliers = _STEP_TO_BOUNDARY * _largest_step(multipliers, step_multipliers)
        new_alpha = alpha + reach_alpha * step_alpha
        new_multipliers = multipliers + reach_multipliers * step_multipliers
        new_level = level + reach_multipliers * step_level
        # Selected on the device, not branched on: a converged iterate (or a step that
        # rounding made unusable) is kept as it is.
        converged = alpha @ slopes - slopes.min() <= _CONVERGED_GAP
        usable = (
            (new_alpha > 0).all()
            & torch.isfinite(new_alpha).all()
            & torch.isfinite(new_multipliers).all()
            & torch.isfinite(new_level)
            & ~converged
        )
        alpha = torch.where(usable, new_alpha, alpha)
        multipliers = torch.where(usable, new_multipliers, multipliers)
        level = torch.where(usable, new_level, level)
    alpha = alpha / alpha.sum()
    largest = alpha.max()
    supports = torch.stack([alpha > threshold * largest for threshold in _POLISH_THRESHOLDS])
    return _best(gram, torch.cat([alpha[None], _face_minima(gram, supports.to(gram.dtype))]))


def _face_minima(gram: Tensor, supports: Tensor) -> Tensor:
    """For each row of ``supports`` (a ``(S, K)`` 0/1 mask), the point of the simplex that
    minimises ``alpha^T M alpha`` on the affine hull of that face, clipped onto the simplex.

    On a support S: ``M_SS alpha_S - mu 1 = 0`` and ``1^T alpha_S = 1``; off S, ``alpha_i = 0``.
    A singular system (tasks with affinely dependent gradients) gives a row of NaN.
    """
    on_face = supports[:, :, None] * supports[:, None, :]
    off_face = torch.diag_embed(1 - supports)
    systems = torch.cat(
        [
            torch.cat([on_face * gram + off_face, -supports[:, :, None]], dim=2),
            torch.cat([supports, torch.zeros_like(supports[:, :1])], dim=1)[:, None, :],
        ],
        dim=1,
    )
    rhs = torch.zeros_like(systems[:, :, 0])
    rhs[:, -1] = 1
    # solve_ex reports a singular system in ``info`` instead of raising: no synchronisation.
    solutions, info = torch.linalg.solve_ex(systems, rhs)
    points = solutions[:, : gram.shape[0]].clamp_min(0)
    points = points / points.sum(dim=1, keepdim=True)
    return torch.where((info == 0)[:, None], points, torch.nan)


def _best(gram: Tensor, candidates: Tensor) -> Tensor:
    """The candidate (a row of ``(C, K)``) with the smallest finite ``alpha^T M alpha``."""
    objectives = ((candidates @ gram) * candidates).sum(dim=1)
    best = torch.where(objectives.isfinite(), objectives, torch.inf).argmin()
    # A one-element index tensor, not a 0-dim one: indexing with a 0-dim tensor reads it on the
    # host (a synchronisation on CUDA).
    return candidates[best.reshape(1)][0]


def _enumerated(gram: Tensor) -> Tensor:
    """The exact minimum for small K: the best face minimum over all 2^K - 1 supports.

    The optimum is the minimum of some face whose gradients are affinely independent
    (Caratheodory), so it is among the candidates; every candidate is a point of the simplex,
    so a badly conditioned face can only lose the comparison.
    """
    num_tasks = gram.shape[0]
    masks = torch.arange(1, 2**num_tasks, device=gram.device)
    bits = 2 ** torch.arange(num_tasks, device=gram.device)
    supports = ((masks[:, None] & bits) != 0).to(gram.dtype)
    return _best(gram, _face_minima(gram, supports))
