"""The Gram-family methods' weights, from the Gram matrix of the task gradients.

Each method of the family aggregates the per-task gradients ``g_i`` of the shared parameters
into one update ``d``; every one here (GradDrop aside) is a combination ``d = sum_i w_i g_i``
whose weights depend on the gradients only through their inner products, the Gram matrix
``M_ij = <g_i, g_j>`` of shape ``(K, K)``. So the methods never touch the K x P gradients: the
fused ``task_gram`` gives ``M`` (one launch on CUDA) and a function below turns it into ``w``.
The trained total is then ``sum_i w_i L_i``: its ordinary backward puts ``d`` into the shared
parameters' ``.grad`` and ``w_i grad L_i`` into each head's.

The functions work in float64 (K x K numbers cost nothing to upcast; the systems of an
ill-conditioned Gram lose cond(M) x 1e-7 in float32) and return the weights in the Gram's
dtype. Randomised methods take their random draws as arguments, so that the caller decides
where they come from (torch's RNG, and the same on every rank).

Notation: ``n_i = ||g_i|| = sqrt(M_ii)``, ``u_i = g_i / n_i`` (0 for a zero gradient),
``C = M / (n n^T)`` the cosines.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NNQP_ENUMERATION_MAX_TASKS",
    "aligned_mtl_weights",
    "cagrad_weights",
    "config_weights",
    "dual_cone_weights",
    "dualproj_weights",
    "fair_weights",
    "graddrop_update",
    "gradvac_weights",
    "imtl_g_weights",
    "pcgrad_weights",
    "projection_orders",
    "upgrad_weights",
]

#: Up to this many tasks the dual-cone projections (UPGrad, DualProj) and CAGrad's inner
#: problem are solved by enumerating the 2^K faces in one batched solve; beyond, by an
#: interior-point method (UPGrad, DualProj) or pairwise Frank-Wolfe steps (CAGrad), each with
#: an exact polish on the face it found.
NNQP_ENUMERATION_MAX_TASKS = 10

#: Interior-point iterations of the dual-cone projections for K > 10, and Frank-Wolfe steps of
#: CAGrad's inner problem for K > 10; Newton steps of the Nash-MTL / FairGrad condition.
INTERIOR_POINT_ITERATIONS = 40
FRANK_WOLFE_STEPS = 400
NEWTON_STEPS = 60

# Thresholds, relative to the largest value, of the supports the polish tries.
_POLISH_THRESHOLDS = (1e-3, 1e-5, 1e-7, 1e-9, 1e-11)


def _float64(gram: Tensor) -> Tensor:
    gram = gram.detach().to(torch.float64)
    return (gram + gram.T) / 2


def _norms(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``n_i`` and ``1 / n_i`` (0 for a zero gradient)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    inverse = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
    return norms, inverse


def _all_subsets(num_tasks: int, like: Tensor) -> Tensor:
    """The ``(2^K, K)`` 0/1 masks of every subset of the tasks, the empty one first."""
    masks = torch.arange(2**num_tasks, device=like.device)
    bits = 2 ** torch.arange(num_tasks, device=like.device)
    return ((masks[:, None] & bits) != 0).to(like.dtype)


def _pick(candidates: Tensor, objectives: Tensor, feasible: Tensor) -> Tensor:
    """Per problem, the feasible candidate of smallest objective: ``candidates`` is
    ``(S, B, K)``, ``objectives`` and ``feasible`` ``(S, B)``; returns ``(B, K)``."""
    scores = torch.where(feasible & objectives.isfinite(), objectives, torch.inf)
    best = scores.argmin(dim=0)  # (B,)
    return candidates.gather(0, best[None, :, None].expand(1, *candidates.shape[1:]))[0]


# --- PCGrad and GradVac ----------------------------------------------------------------------


def projection_orders(num_tasks: int, device: torch.device | str | None = None) -> Tensor:
    """For each task i, a random order of the other tasks: ``(K, K - 1)`` indices, drawn from
    torch's RNG (one ``torch.rand`` of ``(K, K)`` on ``device``: no host synchronisation)."""
    keys = torch.rand(num_tasks, num_tasks, device=device)
    keys.fill_diagonal_(2.0)  # each task's own index sorts last, and is dropped
    return keys.argsort(dim=1)[:, : num_tasks - 1]


def pcgrad_weights(gram: Tensor, orders: Tensor) -> Tensor:
    r"""PCGrad (Yu et al., NeurIPS 2020), Algorithm 1, from the Gram matrix.

    For each task i, with ``g_i^PC = g_i`` at first and each j of ``orders[i]`` in turn: if
    ``<g_i^PC, g_j> < 0``, ``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j`` (projected onto the normal
    plane of the original ``g_j``). The update is the sum ``d = sum_i g_i^PC``.

    Every ``g_i^PC`` is a combination ``sum_j C_ij g_j`` of the original gradients, so
    ``<g_i^PC, g_j> = (C M)_ij`` and the whole algorithm runs on ``C`` (K - 1 steps, each over
    every task at once); ``d = sum_j w_j g_j`` with ``w = C^T 1``. A zero ``g_j`` is skipped.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    tasks = torch.arange(num_tasks, device=gram.device)
    coefficients = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    diagonal = gram.diagonal()
    for step in range(num_tasks - 1):
        others = orders[:, step]
        dots = (coefficients @ gram)[tasks, others]
        squared = diagonal[others]
        scale = torch.where((dots < 0) & (squared > 0), dots / squared.clamp_min(1e-300), 0.0)
        coefficients = coefficients - scale[:, None] * _one_hot(others, num_tasks, gram)
    return coefficients.sum(dim=0).to(dtype)


def _one_hot(indices: Tensor, num_tasks: int, like: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(indices, num_tasks).to(like.dtype)


def gradvac_weights(
    gram: Tensor, orders: Tensor, targets: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    r"""GradVac (Wang et al., ICLR 2021), Algorithm 1, from the Gram matrix.

    For each task i, with ``g_i' = g_i`` at first and each j of ``orders[i]`` in turn: the
    cosine ``phi_ij = cos(g_i', g_j)``; if ``phi_ij < phî_ij`` (the target),

    .. math:: g_i' \mathrel{+}= \frac{\|g_i'\| (\hat\phi_{ij} \sqrt{1 - \phi_{ij}^2}
              - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2})}{\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}} g_j,

    which raises the cosine to the target; and every pair's target follows the EMA
    ``phî_ij <- (1 - beta) phî_ij + beta phi_ij`` of the cosine measured before the change.
    The update is the sum ``d = sum_i g_i'``. Like PCGrad, on the coefficients ``C`` of
    ``g_i' = sum_j C_ij g_j``. Returns the weights ``C^T 1`` and the new targets.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    tasks = torch.arange(num_tasks, device=gram.device)
    coefficients = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    targets = targets.detach().to(gram.dtype)
    new_targets = targets.clone()
    norms, inverse = _norms(gram)
    for step in range(num_tasks - 1):
        others = orders[:, step]
        products = coefficients @ gram
        dots = products[tasks, others]
        own_norms = (products * coefficients).sum(dim=1).clamp_min(0).sqrt()
        own_inverse = torch.where(own_norms > 0, 1 / own_norms.clamp_min(1e-300), 0.0)
        cosines = (dots * own_inverse * inverse[others]).clamp(-1, 1)
        target = targets[tasks, others]
        target_sine = (1 - target.square()).clamp_min(0).sqrt()
        raise_by = (
            own_norms
            * (target * (1 - cosines.square()).clamp_min(0).sqrt() - cosines * target_sine)
            * inverse[others]
            / torch.where(target_sine > 0, target_sine, 1.0)
        )
        adjust = (cosines < target) & (target_sine > 0) & (norms[others] > 0)
        coefficients = coefficients + torch.where(adjust, raise_by, 0.0)[:, None] * _one_hot(
            others, num_tasks, gram
        )
        new_targets[tasks, others] = (1 - beta) * target + beta * cosines
    return coefficients.sum(dim=0).to(dtype), new_targets


# --- IMTL-G, Aligned-MTL, ConFIG ---------------------------------------------------------------


def imtl_g_weights(gram: Tensor) -> Tensor:
    r"""IMTL-G (Liu et al., ICLR 2021): the combination of the gradients, weights summing to 1,
    whose projections on every unit gradient ``u_i`` are equal.

    With ``D`` the rows ``g_1 - g_i`` and ``U`` the rows ``u_1 - u_i`` (i = 2..K), the paper's
    closed form is ``alpha_{2:K} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum alpha_{2:K}``;
    every product is a Gram entry: ``<g_a, u_b> = M_ab / n_b``. When ``D U^T`` is singular (two
    gradients of one direction, or a zero gradient) the projections are equal for every
    weighting of those tasks, and the uniform weights are returned.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return torch.ones(1, dtype=dtype, device=gram.device)
    _, inverse = _norms(gram)
    on_units = gram * inverse[None, :]  # <g_a, u_b>
    # (g_1 - g_i) . (u_1 - u_j), i, j = 2..K
    system = (
        on_units[0, 0] - on_units[0, 1:][None, :] - on_units[1:, :1] + on_units[1:, 1:]
    )  # rows i, columns j
    rhs = on_units[0, 0] - on_units[0, 1:]  # g_1 . (u_1 - u_j)
    # alpha_{2:K} (D U^T) = g_1 U^T: the transposed system.
    rest, info = torch.linalg.solve_ex(system.T, rhs)
    alpha = torch.cat([1 - rest.sum(dim=0, keepdim=True), rest])
    uniform = torch.full_like(alpha, 1 / num_tasks)
    usable = (info == 0) & alpha.isfinite().all()
    return torch.where(usable, alpha, uniform).to(dtype)


def _spectrum(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues, eigenvectors and the mask of the eigenvalues above rounding (relative to the
    largest: ``K * 1e-13``), of a symmetric positive semi-definite float64 matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0)
    significant = values > values.max() * matrix.shape[0] * 1e-13
    return values, vectors, significant


def aligned_mtl_weights(gram: Tensor) -> Tensor:
    r"""Aligned-MTL (Senushkin et al., CVPR 2023): the update of the gradient matrix whose
    singular values are all made equal to the smallest one.

    With ``G`` the K x P matrix of gradients and its SVD ``G = V Σ W^T``, ``M = V Σ^2 V^T``,
    the aligned matrix is ``Ĝ = σ_min V W^T = B G`` with ``B = σ_min V Σ^{-1} V^T``: its rows
    are orthogonal, of one length. The update is ``Ĝ^T ω`` with equal task weights ``ω = 1``
    (the sum of the aligned gradients, as the authors' code does; the paper leaves ``ω`` to
    the user), i.e. ``w = B 1``. Directions of zero
    singular value (linearly dependent gradients) are left out, and ``σ_min`` is the
    smallest nonzero singular value. An all-zero Gram gives zero weights.
    """
    dtype, gram = gram.dtype, _float64(gram)
    values, vectors, significant = _spectrum(gram)
    singular = values.sqrt()
    smallest = torch.where(significant, singular, torch.inf).min()
    smallest = torch.where(significant.any(), smallest, 0.0)
    scaled = torch.where(significant, smallest / torch.where(significant, singular, 1.0), 0.0)
    balance = (vectors * scaled[None, :]) @ vectors.T
    return balance.sum(dim=1).to(dtype)


def config_weights(gram: Tensor) -> Tensor:
    r"""ConFIG (Liu et al., ICLR 2025): the direction with equal cosine to every task gradient,
    scaled by the sum of the gradients' projections on it.

    With the unit gradients ``u_i`` as the rows of ``U``: ``g_u = U^+ 1`` (the least-norm
    solution of ``U g = 1``), ``ĝ_u = g_u / ||g_u||``, and ``d = (sum_i <g_i, ĝ_u>) ĝ_u``.
    In the span of the gradients ``g_u = U^T C^+ 1`` with ``C`` the cosine matrix, so
    ``d = sum_j w_j g_j`` with ``w_j = s c_j / n_j``, ``c = C^+ 1``. A zero gradient gets no
    weight.
    """
    dtype, gram = gram.dtype, _float64(gram)
    _, inverse = _norms(gram)
    cosines = gram * inverse[:, None] * inverse[None, :]
    values, vectors, significant = _spectrum(cosines)
    inverted = torch.where(significant, 1 / torch.where(significant, values, 1.0), 0.0)
    unit_weights = (vectors * inverted[None, :]) @ (vectors.T @ (inverse > 0).to(gram.dtype))
    length = (unit_weights @ cosines @ unit_weights).clamp_min(0).sqrt()
    direction = unit_weights / torch.where(length > 0, length, 1.0)  # on the unit gradients
    on_gradients = direction * inverse  # on the gradients themselves
    size = (gram @ on_gradients).sum()  # sum_i <g_i, ĝ_u>
    return (size * on_gradients).to(dtype)


# --- UPGrad and DualProj: projections onto the dual cone ---------------------------------------


def dual_cone_weights(gram: Tensor, preferences: Tensor) -> Tensor:
    r"""The weights of the projections of ``G^T u_b`` (one per row ``u_b`` of ``preferences``,
    ``(B, K)``) onto the dual cone of the gradients ``{y : <g_i, y> >= 0 for all i}``.

    The projection of ``G^T u`` is ``G^T w`` with ``w = argmin_{v >= u} v^T M v`` (Quinton &
    Rey 2024, Proposition 1): a quadratic program with lower bounds. Its KKT conditions: on the
    free tasks F, ``(M w)_F = 0``; on the others ``w = u`` and ``(M w) >= 0``, so the projection
    never conflicts with a task, ``<g_i, d> = (M w)_i >= 0``.

    - K <= ``NNQP_ENUMERATION_MAX_TASKS``: exact. For every F, ``M_FF w_F = -M_FA u_A``; the
      feasible candidate (``w >= u``) of least objective is the optimum (some optimal F has
      linearly independent gradients, so its system is regular).
    - Larger K: ``INTERIOR_POINT_ITERATIONS`` primal-dual Newton steps on the KKT conditions,
      then the exact solution on the free set they found, kept when it is feasible and better.

    Returns ``(B, K)`` weights, in the Gram's dtype.
    """
    dtype, gram = gram.dtype, _float64(gram)
    preferences = preferences.detach().to(gram.dtype)
    num_tasks = gram.shape[0]
    if num_tasks <= NNQP_ENUMERATION_MAX_TASKS:
        free = _all_subsets(num_tasks, gram)  # (S, K)
    else:
        free = _interior_point_supports(gram, preferences)  # (S, B, K)
    candidates = _on_free_sets(gram, preferences, free)  # (S, B, K)
    scale = preferences.abs().sum(dim=1).clamp_min(1e-300)  # (B,)
    feasible = (candidates >= preferences - 1e-12 * scale[:, None]).all(dim=2)
    objectives = ((candidates @ gram) * candidates).sum(dim=2)
    best = _pick(candidates, objectives, feasible)
    return torch.maximum(best, preferences).to(dtype)


def _on_free_sets(gram: Tensor, preferences: Tensor, free: Tensor) -> Tensor:
    """For each free set (``(S, K)`` or ``(S, B, K)`` masks) and preference ``u_b``: ``w`` with
    ``w_A = u_A`` and ``M_FF w_F = -M_FA u_A``; NaN where the system is singular."""
    batch = preferences.shape[0]
    if free.dim() == 2:
        free = free[:, None, :].expand(-1, batch, -1)
    fixed = 1 - free
    on_free = free[..., :, None] * free[..., None, :]
    # A relative ridge of 1e-12 on the free diagonal: a free set with linearly dependent
    # gradients (a duplicated task) is singular but consistent, and then yields a point too.
    ridge = 1e-12 * gram.diagonal().clamp_min(1e-300)
    systems = on_free * gram + torch.diag_embed(fixed + free * ridge)  # (S, B, K, K)
    pinned = preferences * fixed
    rhs = pinned - free * (pinned @ gram)  # gram is symmetric: (M u_A)_F
    solutions, info = torch.linalg.solve_ex(systems, rhs)
    return torch.where((info == 0)[..., None], solutions, torch.nan)


def _interior_point_supports(gram: Tensor, preferences: Tensor) -> Tensor:
    """Free sets for the polish: a primal-dual interior point on ``min_{v >= u} v^T M v``
    (``v = u + x``, ``x >= 0``, multipliers ``z = M v >= 0``, ``x z = 0``), batched over the
    problems, then the tasks whose ``x`` exceeds each threshold of ``_POLISH_THRESHOLDS``
    relative to the largest. Returns ``(T, B, K)`` masks.

    It runs on the cosines: ``v = n w`` turns the problem into ``min_{v >= n u} v^T C v``, whose
    diagonal is 1 whatever the gradients' norms (norms 1e4 apart left the plain Gram's Newton
    systems too ill-conditioned to find the free set at K = 64)."""
    norms, inverse = _norms(gram)
    present = norms > 0
    cosines = gram * inverse[:, None] * inverse[None, :] + torch.diag((~present).to(gram.dtype))
    num_tasks = preferences.shape[1]
    pinned = preferences * torch.where(present, norms, 1.0)
    pinned = pinned / pinned.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
    slack = torch.ones_like(pinned) / num_tasks
    multipliers = torch.ones_like(pinned)
    for _ in range(INTERIOR_POINT_ITERATIONS):
        residual = (pinned + slack) @ cosines - multipliers  # (B, K)
        gap = (slack * multipliers).sum(dim=1, keepdim=True) / num_tasks
        target = 0.1 * gap
        # (C + diag(z / x)) dx = -residual + (target - x z) / x
        system = cosines + torch.diag_embed(multipliers / slack)
        rhs = -residual + (target - slack * multipliers) / slack
        step, _ = torch.linalg.solve_ex(system, rhs)
        step_multipliers = (target - slack * multipliers - multipliers * step) / slack
        reach = torch.minimum(
            _to_boundary(slack, step), _to_boundary(multipliers, step_multipliers)
        )
        slack_new = slack + 0.99 * reach * step
        multipliers_new = multipliers + 0.99 * reach * step_multipliers
        usable = (
            (slack_new > 0).all(dim=1, keepdim=True)
            & slack_new.isfinite().all(dim=1, keepdim=True)
            & multipliers_new.isfinite().all(dim=1, keepdim=True)
        )
        slack = torch.where(usable, slack_new, slack)
        multipliers = torch.where(usable, multipliers_new, multipliers)
    # The free tasks are those whose slack beats its multiplier (strict complementarity).
    ratio = slack / (slack + multipliers)
    masks = [ratio > threshold for threshold in (0.5, *_POLISH_THRESHOLDS)]
    masks.append(torch.zeros_like(slack, dtype=torch.bool))  # nothing free: w = u
    return torch.stack(masks).to(gram.dtype)


def _to_boundary(values: Tensor, steps: Tensor) -> Tensor:
    """Per row, the largest ``t`` in [0, 1] with ``values + t steps >= 0`` (``values > 0``)."""
    ratios = torch.where(steps < 0, -values / steps.clamp(max=-1e-300), torch.inf)
    return ratios.min(dim=1, keepdim=True).values.clamp(max=1.0)


def upgrad_weights(gram: Tensor) -> Tensor:
    r"""UPGrad (Quinton & Rey 2024): the mean of the projections of every task gradient onto the
    dual cone, ``d = (1/K) sum_i π(g_i)``; ``w`` is the mean of the K projections' weights."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return dual_cone_weights(gram, eye).mean(dim=0).to(gram.dtype)


def dualproj_weights(gram: Tensor) -> Tensor:
    r"""DualProj: the projection of the mean gradient onto the dual cone,
    ``d = π((1/K) sum_i g_i)``."""
    num_tasks = gram.shape[0]
    mean = torch.full((1, num_tasks), 1 / num_tasks, dtype=torch.float64, device=gram.device)
    return dual_cone_weights(gram, mean)[0].to(gram.dtype)


# --- CAGrad ----------------------------------------------------------------------------------


def cagrad_weights(gram: Tensor, c: float) -> Tensor:
    r"""CAGrad (Liu et al., NeurIPS 2021): ``d = g_0 + sqrt(phi) g_w / ||g_w||`` with
    ``g_0`` the mean gradient, ``phi = c^2 ||g_0||^2`` and ``w`` the minimiser over the simplex
    of ``F(w) = <g_w, g_0> + sqrt(phi) ||g_w||`` (the paper's dual problem, eq. 3; its update
    without the optional rescaling by ``1 / (1 + c^2)`` of the authors' code).

    With ``b = M 1 / K`` and ``r = sqrt(phi)``, ``F(w) = b^T w + r sqrt(w^T M w)``. On a face S
    the stationary point is closed-form: ``w_S = (mu u - v) / sqrt(delta)`` with
    ``u = M_S^{-1} 1``, ``v = M_S^{-1} b_S``, ``mu = (1^T v + sqrt(delta)) / 1^T u`` and
    ``delta = (1^T v)^2 - 1^T u (b_S^T v - r^2)``. Up to ``NNQP_ENUMERATION_MAX_TASKS`` tasks
    every face is tried (exact); beyond, ``FRANK_WOLFE_STEPS`` pairwise Frank-Wolfe steps with
    exact line search approach the optimal face, and primal active-set steps on the same
    closed form finish on it.

    Returned: the weights of ``d = sum_i w'_i g_i``, ``w' = 1/K + r w / ||g_w||``.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    uniform = torch.full((num_tasks,), 1 / num_tasks, dtype=gram.dtype, device=gram.device)
    linear = gram @ uniform
    radius = c * (uniform @ linear).clamp_min(0).sqrt()
    if num_tasks == 1:
        weights = uniform
    else:
        if num_tasks <= NNQP_ENUMERATION_MAX_TASKS:
            faces = _all_subsets(num_tasks, gram)[1:]
            start = uniform[None]
        else:
            found = _frank_wolfe(gram, linear, radius)
            start = torch.stack([found, _active_set(gram, linear, radius, found)])
            largest = found.max()
            faces = torch.stack([found > t * largest for t in _POLISH_THRESHOLDS])
            faces = faces.to(gram.dtype)
        candidates = torch.cat([start, _cagrad_face_points(gram, linear, radius, faces)])
        objectives = candidates @ linear + radius * _quadratic(candidates, gram).sqrt()
        scores = torch.where(objectives.isfinite(), objectives, torch.inf)
        weights = candidates[scores.argmin().reshape(1)][0]
    length = (weights @ gram @ weights).clamp_min(0).sqrt()
    step = torch.where(length > 0, radius / torch.where(length > 0, length, 1.0), 0.0)
    return (uniform + step * weights).to(dtype)


def _quadratic(points: Tensor, gram: Tensor) -> Tensor:
    return ((points @ gram) * points).sum(dim=-1).clamp_min(0)


def _cagrad_stationary(
    gram: Tensor, linear: Tensor, radius: Tensor, faces: Tensor
) -> tuple[Tensor, Tensor]:
    """The stationary point of ``F`` on each face's affine hull (``(S, K)`` 0/1 masks), not
    clipped, and whether it exists (a regular system with ``delta > 0``)."""
    on_face = faces[:, :, None] * faces[:, None, :]
    systems = on_face * gram + torch.diag_embed(1 - faces)
    rhs = torch.stack([faces, faces * linear], dim=2)  # [1_S, b_S]
    solutions, info = torch.linalg.solve_ex(systems, rhs)
    u, v = solutions[..., 0] * faces, solutions[..., 1] * faces
    sum_u, sum_v = u.sum(dim=1), v.sum(dim=1)
    delta = sum_v.square() - sum_u * ((faces * linear * v).sum(dim=1) - radius.square())
    root = delta.clamp_min(0).sqrt()
    level = (sum_v + root) / torch.where(sum_u != 0, sum_u, 1.0)
    points = (level[:, None] * u - v) / torch.where(root > 0, root, 1.0)[:, None]
    valid = (info == 0) & (delta > 0) & (sum_u > 0) & points.isfinite().all(dim=1)
    return points, valid


def _cagrad_face_points(gram: Tensor, linear: Tensor, radius: Tensor, faces: Tensor) -> Tensor:
    """The stationary points of the faces clipped onto the simplex; NaN where none exists."""
    points, valid = _cagrad_stationary(gram, linear, radius, faces)
    points = points.clamp_min(0)
    points = points / points.sum(dim=1, keepdim=True)
    return torch.where(valid[:, None], points, torch.nan)


def _active_set(gram: Tensor, linear: Tensor, radius: Tensor, weights: Tensor) -> Tensor:
    """Primal active-set steps on ``F`` from ``weights``: move toward the stationary point of
    the current face, dropping the first task whose weight reaches 0 on the way; at the face's
    optimum, add the task of steepest descent (the Frank-Wolfe vertex) when it improves. The
    face sequence is finite; ``2K`` steps, each selected on the device."""
    num_tasks = gram.shape[0]
    support = weights > 0
    for _ in range(2 * num_tasks):
        face = support.to(gram.dtype)[None]
        point, valid = _cagrad_stationary(gram, linear, radius, face)
        point, valid = point[0], valid[0]
        # The ratio test: the largest step toward the point that keeps every weight >= 0.
        shrinking = support & (point < weights) & (point < 0)
        ratios = torch.where(shrinking, weights / (weights - point).clamp_min(1e-300), 2.0)
        step = ratios.min().clamp(max=1.0)
        blocking = ratios.argmin()
        moved = (weights + step * (point - weights)).clamp_min(0) * support
        moved = moved / moved.sum()
        product = gram @ moved
        length = (moved @ product).clamp_min(1e-300).sqrt()
        slopes = linear + radius * product / length
        entering = torch.where(support, torch.inf, slopes).argmin()
        improves = slopes[entering] < moved @ slopes - 1e-14 * slopes.abs().max()
        reached = step >= 1
        drop = torch.nn.functional.one_hot(blocking, num_tasks).bool() & ~reached
        add = torch.nn.functional.one_hot(entering, num_tasks).bool() & reached & improves
        weights = torch.where(valid, moved, weights)
        support = torch.where(valid, (support & ~drop) | add, support)
    return weights


def _frank_wolfe(gram: Tensor, linear: Tensor, radius: Tensor) -> Tensor:
    """Pairwise Frank-Wolfe on ``F`` over the simplex, each step with its exact line search
    (``F`` along a segment is ``a + beta t + r sqrt(p + 2 q t + s t^2)``)."""
    num_tasks = gram.shape[0]
    weights = torch.full((num_tasks,), 1 / num_tasks, dtype=gram.dtype, device=gram.device)
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    for _ in range(FRANK_WOLFE_STEPS):
        product = gram @ weights
        length = (weights @ product).clamp_min(1e-300).sqrt()
        slope = linear + radius * product / length
        toward = slope.argmin()
        away = torch.where(weights > 0, slope, -torch.inf).argmax()
        direction = eye[toward] - eye[away]
        most = weights[away]
        beta = direction @ linear
        p, q, s = weights @ product, direction @ product, direction @ gram @ direction
        # d/dt: beta + r (q + s t) / sqrt(p + 2 q t + s t^2) = 0
        t = _segment_minimum(beta, radius, p, q, s, most)
        weights = (weights + t * direction).clamp_min(0)
        weights = weights / weights.sum()
    return weights


def _segment_minimum(
    beta: Tensor, radius: Tensor, p: Tensor, q: Tensor, s: Tensor, most: Tensor
) -> Tensor:
    """``argmin_{0 <= t <= most} beta t + r sqrt(p + 2 q t + s t^2)`` (convex in t)."""
    # Stationary points solve (beta^2 - r^2 s) s t^2 + 2 q (beta^2 - r^2 s) t
    #   + beta^2 p - r^2 q^2 = 0, i.e. s t^2 + 2 q t + (beta^2 p - r^2 q^2) / (beta^2 - r^2 s).
    denominator = beta.square() - radius.square() * s
    safe = torch.where(denominator.abs() > 1e-300, denominator, 1.0)
    constant = (beta.square() * p - radius.square() * q.square()) / safe
    s_safe = torch.where(s > 0, s, 1.0)
    discriminant = (q.square() - s * constant).clamp_min(0).sqrt()
    roots = torch.stack([(-q + discriminant) / s_safe, (-q - discriminant) / s_safe])
    candidates = torch.cat([roots.clamp_min(0).minimum(most), torch.stack([most * 0, most])])

    def value(t: Tensor) -> Tensor:
        return beta * t + radius * (p + 2 * q * t + s * t.square()).clamp_min(0).sqrt()

    values = value(candidates)
    values = torch.where(values.isfinite(), values, torch.inf)
    return candidates[values.argmin().reshape(1)][0]


# --- Nash-MTL and FairGrad ----------------------------------------------------------------------


def fair_weights(gram: Tensor, alpha: float) -> Tensor:
    r"""The positive ``w`` with ``M w = w^{-1/alpha}`` (elementwise): FairGrad's condition (Ban &
    Ji, ICML 2024), and for ``alpha = 1`` Nash-MTL's ``G^T G w = 1 / w`` (Navon et al., ICML
    2022; here the rows of ``G`` are the task gradients).

    With ``n`` the norms and ``C`` the cosines, ``v = n w`` solves ``C v = k v^{-1/alpha}``,
    ``k_i = n_i^{1/alpha - 1}``: the stationary point of the strictly convex
    ``f(v) = v^T C v / 2 - sum_i k_i h(v_i)``, ``h'(v) = v^{-1/alpha}`` (``h = log`` at
    ``alpha = 1``). ``NEWTON_STEPS`` damped Newton steps find it, from the best multiple of the
    diagonal problem's solution ``v_i = k_i^{alpha / (1 + alpha)}``; each step stays positive.
    Working on the cosines makes the problem independent of the gradients' scales (norms 100x
    apart leave the same conditioning). Linearly dependent gradients have no solution (f is
    unbounded below): a ridge of 1e-13 on the cosines' diagonal keeps the problem regular. A
    task whose gradient is zero cannot satisfy its equation and is left out, with weight 0.
    """
    dtype, gram = gram.dtype, _float64(gram)
    norms, inverse = _norms(gram)
    present = norms > 0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    cosines = torch.where(present[:, None] & present[None, :], gram * inverse[:, None] * inverse, 0)
    cosines = cosines + torch.diag(torch.where(present, 0.0, 1.0)) + 1e-13 * eye
    exponent = -1 / alpha
    pull = torch.where(present, norms, 1.0) ** (1 / alpha - 1)
    weights = pull ** (alpha / (1 + alpha))
    # The best multiple c of that start: c^{1 + 1/alpha} = sum_i k_i v_i^{1 - 1/alpha} / v^T C v.
    fit = (pull * weights ** (1 + exponent)).sum() / (weights @ cosines @ weights)
    weights = weights * fit ** (alpha / (1 + alpha))
    for _ in range(NEWTON_STEPS):
        gradient = cosines @ weights - pull * weights**exponent
        hessian = cosines + torch.diag(pull * weights ** (exponent - 1) / alpha)
        step, _ = torch.linalg.solve_ex(hessian, -gradient)
        decrement = (-(gradient @ step)).clamp_min(0).sqrt()
        # Newton's damping for self-concordant functions (h = log), full steps near the optimum.
        damping = torch.where(decrement < 0.25, 1.0, 1 / (1 + decrement))
        boundary = _to_boundary(weights[None], step[None])[0, 0]
        new = weights + torch.minimum(damping, 0.9 * boundary) * step
        usable = (new > 0).all() & new.isfinite().all()
        weights = torch.where(usable, new, weights)
    return torch.where(present, weights * inverse, 0.0).to(dtype)


# --- GradDrop ---------------------------------------------------------------------------------


def graddrop_update(task_grads: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    r"""GradDrop (Chen et al., NeurIPS 2020), per coordinate of the stacked gradients
    ``(K, P)``: the sign purity ``P = (1 + sum_i g_i / sum_i |g_i|) / 2``, one uniform draw ``U``
    per coordinate, and the update ``d = sum_i (leak + (1 - leak) m_i) g_i`` with the mask
    ``m_i = [P > U] [g_i > 0] + [P < U] [g_i < 0]``: the positive gradients are kept with
    probability P, the negative ones with 1 - P. A coordinate where every gradient is 0 gives 0.
    """
    total = task_grads.sum(dim=0)
    size = task_grads.abs().sum(dim=0)
    purity = 0.5 * (1 + total / torch.where(size > 0, size, 1.0))
    keep = ((purity > uniform) & (task_grads > 0)) | ((purity < uniform) & (task_grads < 0))
    return ((leak + (1 - leak) * keep.to(task_grads.dtype)) * task_grads).sum(dim=0)
