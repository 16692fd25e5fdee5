"""Float64 references of the Gram-family gradient methods, written from each paper's definition,
independently of fused_mtl.

Conventions shared by every function here:

* ``J`` is a ``(K, P)`` tensor whose row ``i`` is task ``i``'s gradient ``g_i`` of the shared
  parameters (the papers' ``G`` is ``J.T``, so their ``G^T G`` is our Gram ``M = J @ J.T``).
  Inputs are converted to float64; every computation runs in float64.
* Each method returns the aggregated update ``d`` of shape ``(P,)`` (the direction the optimiser
  *descends* along, like a plain gradient) and, where the method is a weighted sum of the rows,
  the weights ``w`` of shape ``(K,)`` with ``d = J.T @ w``.
* Exactness is preferred to speed: the constrained problems (CAGrad's inner problem, the
  projections onto the dual cone) are solved by enumerating active sets, which is exact up to
  rounding for the small ``K`` (at most 8) used in the tests; the fixed-point conditions
  (Nash-MTL, FairGrad) are solved by damped Newton iterations to rounding.
"""

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float64).eps


def _as64(J: Tensor) -> Tensor:
    J = torch.as_tensor(J).to(torch.float64)
    if J.dim() != 2:
        raise ValueError(f"J must be a (K, P) matrix, got shape {tuple(J.shape)}")
    return J


def _orders_or_default(orders: Sequence[Sequence[int]] | None, K: int) -> list[list[int]]:
    """Check ``orders[i]`` is a permutation of the task indices other than ``i``."""
    if orders is None:
        return [[j for j in range(K) if j != i] for i in range(K)]
    if len(orders) != K:
        raise ValueError(f"orders has {len(orders)} entries for K={K} tasks")
    out = []
    for i, order in enumerate(orders):
        order = [int(j) for j in order]
        if sorted(order) != [j for j in range(K) if j != i]:
            raise ValueError(
                f"orders[{i}]={order} is not a permutation of the tasks other than {i}"
            )
        out.append(order)
    return out


def min_norm_weights(J: Tensor, d: Tensor) -> Tensor:
    """The minimum-norm least-squares ``w`` of ``J.T @ w = d`` (the unique one when ``J`` has full
    row rank)."""
    J = _as64(J)
    return torch.linalg.pinv(J.T) @ torch.as_tensor(d, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# PCGrad
# --------------------------------------------------------------------------------------------


def pcgrad_rows(J: Tensor, orders: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, Tensor]:
    """The projected gradients ``g_i^PC`` of PCGrad (Yu et al. 2020, "Gradient Surgery for
    Multi-Task Learning", Algorithm 1), one row per task, and their coefficients ``C`` with
    ``g_i^PC = sum_k C[i, k] g_k``.

    For each task ``i``, ``g_i^PC`` starts at ``g_i`` and, for ``j`` in ``orders[i]`` (the other
    tasks, in the given order), if ``g_i^PC . g_j < 0`` it is replaced by
    ``g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j``. The projection is onto the ORIGINAL ``g_j``
    (Algorithm 1 projects the running ``g_i^PC`` onto the unmodified ``g_j``). A zero ``g_j`` is
    skipped. A dot product of exactly 0 is not a conflict (strict ``< 0``).
    """
    J = _as64(J)
    K = J.shape[0]
    order_lists = _orders_or_default(orders, K)
    sq_norms = (J * J).sum(dim=1)
    rows = J.clone()
    coeffs = torch.eye(K, dtype=torch.float64)
    for i in range(K):
        g = J[i].clone()
        c = coeffs[i].clone()
        for j in order_lists[i]:
            if sq_norms[j] == 0:
                continue
            dot = torch.dot(g, J[j])
            if dot < 0:
                factor = dot / sq_norms[j]
                g = g - factor * J[j]
                c[j] -= factor
        rows[i] = g
        coeffs[i] = c
    return rows, coeffs


def pcgrad(J: Tensor, orders: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, Tensor]:
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    Algorithm 1): ``d = sum_i g_i^PC`` (SUM over tasks, as in the paper's
    ``Delta theta = g^PC = sum_i g_i^PC``), with ``g_i^PC`` from :func:`pcgrad_rows`.

    ``orders[i]`` lists the other tasks in the order ``g_i^PC`` is projected against them (the
    paper draws it at random; ``None`` means ascending order). Returns ``(d, w)`` with
    ``w = C.sum(0)`` the tracked coefficients, so ``d = J.T @ w``.
    """
    rows, coeffs = pcgrad_rows(J, orders)
    return rows.sum(dim=0), coeffs.sum(dim=0)


# --------------------------------------------------------------------------------------------
# GradVac
# --------------------------------------------------------------------------------------------


def gradvac_rows(
    J: Tensor,
    orders: Sequence[Sequence[int]] | None,
    targets: Tensor,
    beta: float,
    *,
    ema_on_every_pair: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The vaccinated gradients ``g_i^GV`` of GradVac (Wang et al. 2021, "Gradient Vaccine:
    Investigating and Improving Multi-task Optimization in Massively Multilingual Models",
    ICLR 2021, Algorithm 1), their coefficients ``C`` (``g_i^GV = sum_k C[i, k] g_k``), and the
    updated EMA targets.

    For each ``i`` (in index order), ``g_i^GV`` starts at ``g_i``; for ``j`` in ``orders[i]``:

    * ``phi_ij = cos(g_i^GV, g_j)`` (the running ``g_i^GV`` against the ORIGINAL ``g_j``);
    * if ``phi_ij < phi_hat_ij``: ``g_i^GV += ||g_i^GV|| (phi_hat sqrt(1 - phi^2) - phi
      sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j``, which makes
      ``cos(g_i^GV, g_j)`` equal to ``phi_hat_ij``;
    * ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij`` with the ``phi_ij`` computed BEFORE
      the adjustment. With ``ema_on_every_pair=True`` (default, as we read Algorithm 1: the EMA
      line sits after the ``if`` block) this happens for every visited pair; with ``False`` only
      for pairs that were adjusted (the variant found in some public implementations).

    The targets read in the comparison are the values before this call's update of that pair;
    each pair ``(i, j)`` is visited once per call, so the order of the ``i`` loop does not matter
    for the targets. A pair where ``g_i^GV`` or ``g_j`` is zero is skipped entirely (no
    adjustment, no EMA update). ``phi`` is clamped to ``[-1, 1]`` inside the square root only.
    ``|phi_hat| < 1`` is required for an adjusted pair. ``targets[i, i]`` is never read or written.
    """
    J = _as64(J)
    K = J.shape[0]
    order_lists = _orders_or_default(orders, K)
    new_targets = torch.as_tensor(targets, dtype=torch.float64).clone()
    if new_targets.shape != (K, K):
        raise ValueError(f"targets must be ({K}, {K}), got {tuple(new_targets.shape)}")
    beta = float(beta)
    norms = J.norm(dim=1)
    rows = J.clone()
    coeffs = torch.eye(K, dtype=torch.float64)
    for i in range(K):
        g = J[i].clone()
        c = coeffs[i].clone()
        for j in order_lists[i]:
            norm_i = g.norm()
            if norm_i == 0 or norms[j] == 0:
                continue
            phi = float(torch.dot(g, J[j]) / (norm_i * norms[j]))
            target = float(new_targets[i, j])
            adjusted = False
            if phi < target:
                sin_phi = math.sqrt(max(0.0, 1.0 - min(1.0, phi * phi)))
                sin_target = math.sqrt(1.0 - target * target)
                factor = norm_i * (target * sin_phi - phi * sin_target) / (norms[j] * sin_target)
                g = g + factor * J[j]
                c[j] += factor
                adjusted = True
            if ema_on_every_pair or adjusted:
                new_targets[i, j] = (1.0 - beta) * target + beta * phi
        rows[i] = g
        coeffs[i] = c
    return rows, coeffs, new_targets


def gradvac(
    J: Tensor,
    orders: Sequence[Sequence[int]] | None,
    targets: Tensor,
    beta: float,
    *,
    ema_on_every_pair: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """GradVac (Wang et al. 2021, ICLR 2021, Algorithm 1, whole model as one component):
    ``d = sum_i g_i^GV`` (SUM over tasks, like PCGrad, which GradVac generalises), with the
    rows and the EMA rule of :func:`gradvac_rows`. Returns ``(d, w, new_targets)`` with
    ``d = J.T @ w``; ``targets`` (``(K, K)``, the ``phi_hat``; the paper starts them at 0) is not
    modified in place.
    """
    rows, coeffs, new_targets = gradvac_rows(
        J, orders, targets, beta, ema_on_every_pair=ema_on_every_pair
    )
    return rows.sum(dim=0), coeffs.sum(dim=0), new_targets


# --------------------------------------------------------------------------------------------
# CAGrad
# --------------------------------------------------------------------------------------------


def cagrad_inner_objective(J: Tensor, c: float, w: Tensor) -> Tensor:
    """CAGrad's inner (dual) objective (Liu et al. 2021, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021, Algorithm 1):
    ``F(w) = g_w . g0 + sqrt(phi) ||g_w||`` with ``g_w = sum_i w_i g_i``, ``g0`` the MEAN
    gradient and ``phi = c^2 ||g0||^2``. ``w`` is meant to lie on the simplex.
    """
    J = _as64(J)
    w = torch.as_tensor(w, dtype=torch.float64)
    g0 = J.mean(dim=0)
    g_w = J.T @ w
    return torch.dot(g_w, g0) + float(c) * g0.norm() * g_w.norm()


def _cagrad_solve(J: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact solution of CAGrad's inner problem by enumerating supports; returns
    ``(d, w_total, w_star)``.

    KKT: at the minimiser ``w*`` of ``F`` over the simplex, with ``d = g0 + r x / ||x||``,
    ``x = J.T w*``, ``r = c ||g0||``, every task in the support has ``g_i . d = lambda`` and every
    other task ``g_i . d >= lambda`` (``d`` maximises ``min_i g_i . d`` over the ball
    ``||d - g0|| <= r``, the primal problem). By conic Caratheodory the support can be taken with
    linearly independent rows ``S``; writing ``d = g0 + J_S.T v`` (``v >= 0``, ``||J_S.T v|| = r``),
    ``M_SS v = lambda 1 - J_S g0`` and ``v^T M_SS v = r^2`` give a quadratic in ``lambda`` whose
    larger root is the only one with ``sum(v) >= 0``. Every candidate ``d`` (rescaled to lie on
    the sphere exactly) is primal-feasible, so the optimum is the candidate with the largest
    ``min_i g_i . d`` among those with ``v >= 0``; its ``w* = v / sum(v)``.
    """
    J = _as64(J)
    K = J.shape[0]
    g0 = J.mean(dim=0)
    r = float(c) * g0.norm()
    b = J @ g0
    if r == 0:
        # c = 0 or g0 = 0: d = g0; any simplex vertex minimising g_i . g0 solves the inner problem.
        w_star = torch.zeros(K, dtype=torch.float64)
        w_star[int(torch.argmin(b))] = 1.0
        return g0.clone(), torch.full((K,), 1.0 / K, dtype=torch.float64), w_star
    M = J @ J.T
    norms = J.norm(dim=1)
    scale = g0.norm() * norms.max() * (1.0 + float(c))
    candidates = []
    for size in range(1, K + 1):
        for S in itertools.combinations(range(K), size):
            idx = list(S)
            J_S = J[idx]
            if int(torch.linalg.matrix_rank(J_S)) < size:
                continue
            M_SS = M[idx][:, idx]
            ones = torch.ones(size, dtype=torch.float64)
            p = torch.linalg.solve(M_SS, ones)
            q = torch.linalg.solve(M_SS, b[idx])
            a_ = torch.dot(ones, p)
            beta_ = torch.dot(ones, q)
            gamma_ = torch.dot(b[idx], q)
            disc = beta_ * beta_ - a_ * (gamma_ - r * r)
            if disc < 0:
                continue
            lam = (beta_ + torch.sqrt(disc)) / a_
            v = lam * p - q
            x = J_S.T @ v
            x_norm = x.norm()
            if x_norm == 0:
                continue
            v = v * (r / x_norm)
            d = g0 + (r / x_norm) * x
            score = float((J @ d).min())
            v_ok = bool((v * norms[idx] >= -1e-10 * r).all()) and float(v.sum()) > 0
            candidates.append((score, v_ok, idx, v, d))
    valid = [cand for cand in candidates if cand[1]]
    if not valid:
        raise ValueError("CAGrad reference: no valid support found (degenerate input)")
    score, _, idx, v, d = max(valid, key=lambda cand: cand[0])
    best_any = max(cand[0] for cand in candidates)
    if best_any - score > 1e-10 * scale:
        raise ValueError("CAGrad reference: degenerate input (optimum without a valid support)")
    w_star = torch.zeros(K, dtype=torch.float64)
    w_star[idx] = v.clamp(min=0.0) / v.clamp(min=0.0).sum()
    w_total = torch.full((K,), 1.0 / K, dtype=torch.float64)
    w_total[idx] += v
    # Duality gap: F(w*) must equal min_i g_i . d (strong duality) at the optimum.
    gap = float(cagrad_inner_objective(J, c, w_star)) - score
    if abs(gap) > 1e-9 * scale:
        raise ValueError(f"CAGrad reference: duality gap {gap:.3e} (degenerate input, x* = 0?)")
    return d, w_total, w_star


def cagrad_inner_weights(J: Tensor, c: float) -> Tensor:
    """The minimiser ``w*`` over the simplex of :func:`cagrad_inner_objective` (Liu et al. 2021,
    Algorithm 1), computed exactly by the support enumeration of :func:`cagrad`."""
    return _cagrad_solve(J, c)[2]


def cagrad(J: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Algorithm 1), the paper's update without any rescaling:
    ``g0 = (1/K) sum_i g_i`` (MEAN), ``phi = c^2 ||g0||^2``,
    ``w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||``,
    ``d = g0 + (sqrt(phi) / ||g_w*||) g_w*``.

    Returns ``(d, w)`` with the total weights ``w = 1/K + (sqrt(phi) / ||g_w*||) w*`` so that
    ``d = J.T @ w``. ``||d - g0|| = c ||g0||`` and ``d`` maximises ``min_i g_i . d`` on that ball.
    ``c = 0`` (or ``g0 = 0``) gives ``d = g0``. Inputs whose optimum has ``g_w* = 0`` (the formula
    is undefined there) raise ``ValueError``. (Some public implementations divide ``d`` by
    ``1 + c^2`` or ``1 + c``; that rescaling is not part of Algorithm 1 and is not applied.)
    """
    d, w_total, _ = _cagrad_solve(J, c)
    return d, w_total


# --------------------------------------------------------------------------------------------
# IMTL-G
# --------------------------------------------------------------------------------------------


def imtl_g(J: Tensor) -> tuple[Tensor, Tensor]:
    """IMTL-G, the gradient part of IMTL (Liu et al. 2021, "Towards Impartial Multi-task
    Learning", ICLR 2021, the closed form of the IMTL-G section): ``u_i = g_i / ||g_i||``,
    ``D = [g_1 - g_2, ..., g_1 - g_K]^T``, ``U = [u_1 - u_2, ..., u_1 - u_K]^T``,
    ``alpha_{2:K} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum_{i>=2} alpha_i``,
    ``d = sum_i alpha_i g_i``: the weights SUM TO 1 and ``d . u_i`` is the same for every ``i``.

    ``K = 1`` gives ``d = g_1``, ``w = [1]``. A zero gradient (``u_i`` undefined) or a singular
    ``D U^T`` raises.
    """
    J = _as64(J)
    K = J.shape[0]
    if K == 1:
        return J[0].clone(), torch.ones(1, dtype=torch.float64)
    norms = J.norm(dim=1)
    if (norms == 0).any():
        raise ValueError("IMTL-G reference: a zero gradient has no unit vector")
    u = J / norms[:, None]
    D = J[0:1] - J[1:]
    U = u[0:1] - u[1:]
    A = D @ U.T  # (K-1, K-1)
    rhs = U @ J[0]  # (g_1 U^T)^T
    alpha_rest = torch.linalg.solve(A.T, rhs)  # alpha A = g_1 U^T  <=>  A^T alpha^T = U g_1
    alpha = torch.cat([(1.0 - alpha_rest.sum()).reshape(1), alpha_rest])
    return J.T @ alpha, alpha


# --------------------------------------------------------------------------------------------
# Aligned-MTL
# --------------------------------------------------------------------------------------------


def aligned_mtl_matrix(J: Tensor) -> tuple[Tensor, Tensor]:
    """The aligned gradient matrix of Aligned-MTL (Senushkin et al. 2023, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1) and its balance matrix ``B``.

    With the Gram ``M = J J^T = V diag(lambda) V^T`` (eigh), ``R`` the numerical rank (eigenvalues
    above ``lambda_max * K * eps64`` are kept, the others, and their eigenvectors, are dropped),
    ``sigma_min^2 = lambda_R`` the smallest KEPT eigenvalue,
    ``B = sqrt(lambda_R) V_R diag(lambda_R..^{-1/2}) V_R^T`` and the aligned rows are
    ``J_hat = B J`` (the paper's ``G_hat = G B``): its nonzero singular values all equal
    ``sigma_min``, its row space is that of ``J``, and it is ``sigma_min`` times the polar factor
    of ``J`` on that row space. A zero ``J`` gives ``B = 0``.
    """
    J = _as64(J)
    K = J.shape[0]
    M = J @ J.T
    lam, V = torch.linalg.eigh(M)
    lam_max = float(lam.max()) if K else 0.0
    if lam_max <= 0:
        B = torch.zeros(K, K, dtype=torch.float64)
        return B @ J, B
    keep = lam > lam_max * K * _EPS
    lam_R, V_R = lam[keep], V[:, keep]
    sigma_min = torch.sqrt(lam_R.min())
    B = sigma_min * (V_R / torch.sqrt(lam_R)[None, :]) @ V_R.T
    return B @ J, B


def aligned_mtl(J: Tensor, task_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Aligned-MTL (Senushkin et al. 2023, CVPR 2023, Algorithm 1): ``d = G_hat omega`` with
    ``G_hat`` the aligned matrix of :func:`aligned_mtl_matrix`, i.e. ``d = J_hat.T @ omega``,
    and weights ``w = B omega`` (``d = J.T @ w``).

    ``omega`` are the paper's pre-defined task weights; the default is ``omega = 1`` (a SUM of the
    aligned rows), which is what the authors' public implementation uses (it sums the aligned
    gradients); the paper leaves ``omega`` as a user choice. Zero singular values are dropped
    (rank-``R`` pseudo-inverse), and ``sigma_min`` is the smallest NONZERO singular value.
    """
    J = _as64(J)
    K = J.shape[0]
    omega = (
        torch.ones(K, dtype=torch.float64)
        if task_weights is None
        else torch.as_tensor(task_weights, dtype=torch.float64)
    )
    J_hat, B = aligned_mtl_matrix(J)
    return J_hat.T @ omega, B @ omega


# --------------------------------------------------------------------------------------------
# UPGrad and DualProj: projections onto the dual cone {y : J y >= 0}
# --------------------------------------------------------------------------------------------


def project_dual_cone(J: Tensor, x: Tensor) -> Tensor:
    """The Euclidean projection of ``x`` onto the dual cone ``{y : J y >= 0}``, computed in the
    PRIMAL by active-set enumeration.

    KKT: ``y* = x + J_A^T mu`` with ``mu >= 0`` on the active set ``A`` (``J_A y* = 0``). For
    every subset ``S`` of the constraints (the empty one included), the candidate is
    ``y_S = x + J_S^T mu_S`` with ``-J_S^T mu_S`` the orthogonal projection of ``x`` onto the row
    space of ``J_S`` (so ``J_S y_S = 0``). The projection ``y*`` equals ``y_A``, and also ``y_S``
    for a linearly independent ``S`` with ``mu_S >= 0`` (conic Caratheodory). Among the
    candidates that are feasible (``g_i . y >= -1e-11 ||g_i|| ||x||``) and have nonnegative
    multipliers (the KKT conditions, sufficient for this convex problem), the closest to ``x``
    is returned; if rounding rejects them all, the closest feasible one.
    """
    J = _as64(J)
    x = torch.as_tensor(x, dtype=torch.float64)
    K = J.shape[0]
    x_norm = x.norm()
    if x_norm == 0:
        return x.clone()
    norms = J.norm(dim=1)
    feas_tol = 1e-11 * norms * x_norm
    best: tuple[float, Tensor] | None = None
    fallback: tuple[float, Tensor] | None = None
    for size in range(K + 1):
        for S in itertools.combinations(range(K), size):
            idx = list(S)
            if size == 0:
                y = x.clone()
                mu_ok = True
            else:
                J_S = J[idx]
                mu = -(torch.linalg.pinv(J_S.T) @ x)
                y = x + J_S.T @ mu
                mu_ok = bool((mu * norms[idx] >= -1e-11 * x_norm).all())
            if ((J @ y) < -feas_tol).any():
                continue
            dist = float((y - x).norm())
            if mu_ok and (best is None or dist < best[0]):
                best = (dist, y)
            if fallback is None or dist < fallback[0]:
                fallback = (dist, y)
    chosen = best if best is not None else fallback
    assert chosen is not None  # y = 0 is always feasible, so some candidate exists
    return chosen[1]


def upgrad(J: Tensor) -> tuple[Tensor, Tensor]:
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", the
    definition of the UPGrad aggregator): ``d = (1/K) sum_i pi(g_i)`` (MEAN of the projected
    rows), ``pi`` the Euclidean projection onto the dual cone ``{y : J y >= 0}``, computed in the
    primal by :func:`project_dual_cone`. Returns ``(d, w)`` with ``w`` the minimum-norm solution
    of ``J.T @ w = d`` (unique when ``J`` has full row rank).
    """
    J = _as64(J)
    K = J.shape[0]
    d = torch.stack([project_dual_cone(J, J[i]) for i in range(K)]).mean(dim=0)
    return d, min_norm_weights(J, d)


def dualproj(J: Tensor) -> tuple[Tensor, Tensor]:
    """DualProj (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", after
    the projection of GEM, Lopez-Paz & Ranzato 2017): ``d = pi((1/K) sum_i g_i)``, the projection
    of the MEAN gradient onto the dual cone ``{y : J y >= 0}`` (primal solver of
    :func:`project_dual_cone`). Returns ``(d, w)`` with ``w`` the minimum-norm solution of
    ``J.T @ w = d``.
    """
    J = _as64(J)
    d = project_dual_cone(J, J.mean(dim=0))
    return d, min_norm_weights(J, d)


# --------------------------------------------------------------------------------------------
# ConFIG
# --------------------------------------------------------------------------------------------


def config(J: Tensor) -> tuple[Tensor, Tensor]:
    """ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", arXiv 2408.11104 / ICLR 2025, the ConFIG operator):
    ``u_i = g_i / ||g_i||``, ``g_u = pinv([u_1 ... u_K]^T) 1_K`` normalised to ``g_u_hat``, and
    ``d = (sum_i g_i . g_u_hat) g_u_hat``: the length is the SUM of the projections of the
    gradients on the direction (the paper's default "projection length"; direction weights
    ``w_hat = 1``). ``d . u_i`` is the same for every ``i`` when ``K <= P`` and ``J`` has full row
    rank. The paper's ``eps`` in the normalisations is not used (exact); a zero gradient raises.
    Returns ``(d, w)`` with ``w`` the minimum-norm solution of ``J.T @ w = d``.
    """
    J = _as64(J)
    norms = J.norm(dim=1)
    if (norms == 0).any():
        raise ValueError("ConFIG reference: a zero gradient has no unit vector")
    U = J / norms[:, None]  # rows u_i: this is [u_1 ... u_K]^T
    g_u = torch.linalg.pinv(U) @ torch.ones(J.shape[0], dtype=torch.float64)
    g_u_hat = g_u / g_u.norm()
    d = (J @ g_u_hat).sum() * g_u_hat
    return d, min_norm_weights(J, d)


# --------------------------------------------------------------------------------------------
# Nash-MTL and FairGrad: G^T G w = w^(-1/alpha)
# --------------------------------------------------------------------------------------------


def _solve_power_balance(M: Tensor, alpha_fair: float, max_iter: int = 500) -> Tensor:
    """Solve ``M w = w^(-1/alpha)`` (elementwise power), ``w > 0``, for a positive definite ``M``.

    It is the stationarity condition of the strictly convex
    ``f(w) = 1/2 w^T M w - sum_i h(w_i)``, ``h' (w) = w^(-1/alpha)`` (``h = log`` for
    ``alpha = 1``), whose Hessian ``M + (1/alpha) diag(w^(-1/alpha - 1))`` is positive definite.
    Damped Newton from ``w = t 1`` (``t`` balancing the trace), steps cut to stay positive and
    accepted when they decrease ``f`` (Armijo) or the residual norm; it stops at a relative
    residual of a few ulps.
    """
    K = M.shape[0]
    p = 1.0 / float(alpha_fair)

    def h(w: Tensor) -> Tensor:
        if p == 1.0:
            return torch.log(w).sum()
        return (w ** (1.0 - p)).sum() / (1.0 - p)

    def f(w: Tensor) -> Tensor:
        return 0.5 * w @ M @ w - h(w)

    def grad(w: Tensor) -> Tensor:
        return M @ w - w ** (-p)

    trace = float(torch.diagonal(M).sum())
    if trace <= 0:
        raise ValueError("the Gram matrix must be positive definite")
    w = torch.full((K,), (K / trace) ** (1.0 / (1.0 + p)), dtype=torch.float64)
    for _ in range(max_iter):
        r = grad(w)
        magnitude = (M.abs() @ w + w ** (-p)).max()
        if r.abs().max() <= 4 * K * _EPS * magnitude:
            break
        H = M + p * torch.diag(w ** (-p - 1.0))
        step = -torch.linalg.solve(H, r)
        t = 1.0
        negative = step < 0
        if negative.any():
            t = min(1.0, 0.99 * float((-w[negative] / step[negative]).min()))
        f0, r0 = f(w), r.norm()
        slope = float(r @ step)
        accepted = False
        for _ in range(80):
            w_new = w + t * step
            if (w_new > 0).all() and (
                f(w_new) <= f0 + 1e-4 * t * slope or grad(w_new).norm() < (1 - 1e-4 * t) * r0
            ):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        w = w_new
    return w


def nash_mtl_condition(J: Tensor, alpha: Tensor) -> Tensor:
    """Residual of the Nash-MTL condition (Navon et al. 2022, "Multi-Task Learning as a
    Bargaining Game", ICML 2022: ``G^T G alpha = 1/alpha`` elementwise) in our row convention:
    ``(J J^T) alpha - 1/alpha``."""
    J = _as64(J)
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    return (J @ J.T) @ alpha - 1.0 / alpha


def nash_mtl_weights(J: Tensor) -> Tensor:
    """The Nash bargaining weights of Nash-MTL (Navon et al. 2022, ICML 2022): the ``alpha > 0``
    with ``(J J^T) alpha = 1/alpha``, solved by damped Newton on
    ``1/2 alpha^T M alpha - sum_i log alpha_i`` to a relative residual of a few ulps. The update
    is ``d = J.T @ alpha`` (no normalisation). Requires ``J`` of full row rank.
    """
    J = _as64(J)
    return _solve_power_balance(J @ J.T, 1.0)


def fairgrad_condition(J: Tensor, w: Tensor, alpha_fair: float) -> Tensor:
    """Residual of the FairGrad condition (Ban & Ji 2024, "Fair Resource Allocation in
    Multi-Task Learning", ICML 2024: ``G^T G w = w^(-1/alpha)`` elementwise, the paper's Eq. 4
    for the weights of ``d = G w``) in our row convention: ``(J J^T) w - w^(-1/alpha)``."""
    J = _as64(J)
    w = torch.as_tensor(w, dtype=torch.float64)
    return (J @ J.T) @ w - w ** (-1.0 / float(alpha_fair))


def fairgrad_weights(J: Tensor, alpha_fair: float) -> Tensor:
    """The FairGrad weights (Ban & Ji 2024, ICML 2024): the ``w > 0`` with
    ``(J J^T) w = w^(-1/alpha)``; the update is ``d = J.T @ w`` (a plain weighted SUM, no
    normalisation). ``alpha = 1`` is Nash-MTL's condition. Solved by damped Newton on the convex
    potential ``1/2 w^T M w - sum_i w_i^(1 - 1/alpha) / (1 - 1/alpha)`` (``log`` at
    ``alpha = 1``). Requires ``alpha > 0`` and ``J`` of full row rank.
    """
    if not float(alpha_fair) > 0:
        raise ValueError("alpha_fair must be positive")
    J = _as64(J)
    return _solve_power_balance(J @ J.T, float(alpha_fair))


# --------------------------------------------------------------------------------------------
# GradDrop
# --------------------------------------------------------------------------------------------


def graddrop(J: Tensor, uniform: Tensor, leak: float | Tensor = 0.0) -> Tensor:
    """GradDrop (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout", NeurIPS 2020, Eqs. 1-2 and Algorithm 1) applied per coordinate of
    the stacked gradients, with ``f`` the identity:

    * ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)`` per coordinate (the positive sign purity); at a
      coordinate where every ``g_i`` is 0 we set ``P = 1/2`` (irrelevant: every term is 0 there);
    * ``mask_i = [P > U] [g_i > 0] + [P < U] [g_i < 0]`` with ``U = uniform`` (strict
      inequalities: ``P == U`` or ``g_i == 0`` gives 0);
    * ``d = sum_i (leak_i + (1 - leak_i) mask_i) g_i`` (SUM over tasks; Algorithm 1's leak
      parameters, ``leak = 0`` is pure GradDrop, ``leak = 1`` the plain sum).

    The paper computes the signs on ``sgn(A) * grad_A L_i`` for an activation layer ``A`` (summed
    over the batch); applied directly to parameter gradients, as here, that sign factor is 1.
    ``leak`` is a float or a ``(K,)`` tensor.
    """
    J = _as64(J)
    K, P = J.shape
    U = torch.as_tensor(uniform, dtype=torch.float64)
    if U.shape != (P,):
        raise ValueError(f"uniform must have shape ({P},), got {tuple(U.shape)}")
    leak_t = torch.as_tensor(leak, dtype=torch.float64)
    if leak_t.dim() == 0:
        leak_t = leak_t.expand(K)
    total = J.sum(dim=0)
    total_abs = J.abs().sum(dim=0)
    purity = torch.where(
        total_abs > 0,
        0.5 * (1.0 + total / torch.where(total_abs > 0, total_abs, torch.ones_like(total_abs))),
        torch.full_like(total, 0.5),
    )
    keep_positive = (purity > U).to(torch.float64)
    keep_negative = (purity < U).to(torch.float64)
    masks = keep_positive[None, :] * (J > 0) + keep_negative[None, :] * (J < 0)
    factors = leak_t[:, None] + (1.0 - leak_t[:, None]) * masks
    return (factors * J).sum(dim=0)


# --------------------------------------------------------------------------------------------
# Robust aggregators: Krum (Blanchard et al. 2017) and the trimmed mean (Yin et al. 2018)
# --------------------------------------------------------------------------------------------


def krum(
    J: Tensor, byzantine: int = 0, selected: int = 1, power: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Krum / Multi-Krum: score(i) = sum of the squared distances from g_i to its K - f - 2
    closest other rows; the ``selected`` rows of lowest score (lowest index first on ties)
    are averaged. ``power=1`` sums the distances themselves (TorchJD's score)."""
    J = _as64(J)
    K = J.shape[0]
    scores = []
    for i in range(K):
        distances = sorted(
            float(torch.sum((J[i] - J[j]) ** 2)) ** (power / 2) for j in range(K) if j != i
        )
        scores.append(sum(distances[: K - byzantine - 2]))
    chosen = sorted(range(K), key=lambda i: (scores[i], i))[:selected]
    w = torch.zeros(K, dtype=torch.float64)
    w[chosen] = 1.0 / selected
    return J.T @ w, w


def trimmed_mean(J: Tensor, trim: int) -> Tensor:
    """The coordinate-wise trimmed mean: per column, the ``trim`` smallest and largest values
    dropped, the rest averaged."""
    J = _as64(J)
    K = J.shape[0]
    columns = []
    for column in J.T.tolist():
        kept = sorted(column)[trim : K - trim]
        columns.append(sum(kept) / len(kept))
    return torch.tensor(columns, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# NTKMTL (Qin et al., NeurIPS 2025), Eq. 15
# --------------------------------------------------------------------------------------------


def ntk_weights_from_kernels(kernels: Sequence[Tensor], exponent: float = 0.5) -> Tensor:
    """w_i = (mean_j lambda_j / lambda_i)^p with lambda_i the largest eigenvalue of task i's
    NTK (each given as a symmetric matrix), by eigvalsh in float64."""
    largest = torch.stack([torch.linalg.eigvalsh(_as64(K))[-1] for K in kernels])
    return (largest.mean() / largest) ** exponent


def ntkmtl(J: Tensor, exponent: float = 0.5) -> tuple[Tensor, Tensor]:
    """NTKMTL with the batch as one part: task i's NTK is the 1 x 1 matrix g_i g_i^T."""
    J = _as64(J)
    w = ntk_weights_from_kernels(
        [J[i : i + 1] @ J[i : i + 1].T for i in range(J.shape[0])], exponent
    )
    return J.T @ w, w
