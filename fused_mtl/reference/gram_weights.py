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

from fused_mtl.reference.gram import unit_scale

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
    "krum_weights",
    "ntk_weights",
    "pcgrad_weights",
    "projection_orders",
    "representation_ntk_eigenvalues",
    "smoothed_weights",
    "trimmed_mean_update",
    "upgrad_weights",
]

#: Up to this many tasks the dual-cone projections (UPGrad, DualProj) and CAGrad's inner
#: problem are solved by enumerating the 2^K faces in one batched solve; beyond, by an
#: interior-point method, with an exact polish on the face it found.
NNQP_ENUMERATION_MAX_TASKS = 10

#: Interior-point iterations of the dual-cone projections and of CAGrad's inner problem for
#: K > 10; Newton steps of the Nash-MTL / FairGrad condition.
INTERIOR_POINT_ITERATIONS = 60
NEWTON_STEPS = 60

# Thresholds, relative to the largest value, of the supports the polish tries.
_POLISH_THRESHOLDS = (1e-3, 1e-5, 1e-7, 1e-9, 1e-11)


def _float64(gram: Tensor) -> Tensor:
    """The Gram in float64, symmetrised and divided by ``unit_scale(gram)``: every method here
    but Nash-MTL / FairGrad gives the same weights for ``c M`` as for ``M`` (``c > 0``), and on
    the scaled Gram its thresholds and solvers see numbers near 1 whatever the gradients' scale
    (a power of two: the division is exact)."""
    gram = gram.detach().to(torch.float64)
    return (gram + gram.T) / (2 * unit_scale(gram))


def _host_reads_wait_for_nothing(gram: Tensor) -> bool:
    """Whether a solver may read a convergence test on the host and stop early: on a CPU
    outside torch.compile (elsewhere the read would wait for the device, or break the graph,
    and the fixed iteration count runs)."""
    return gram.device.type == "cpu" and not torch.compiler.is_compiling()


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
        # Only cosines that were measured move the targets: a zero gradient has no angle, and a
        # non-finite step must not leave the EMA non-finite for every later step.
        measured = (own_norms > 0) & (norms[others] > 0) & cosines.isfinite()
        new_targets[tasks, others] = torch.where(
            measured, (1 - beta) * target + beta * cosines, target
        )
    return coefficients.sum(dim=0).to(dtype), new_targets


# --- IMTL-G, Aligned-MTL, ConFIG ---------------------------------------------------------------


def imtl_g_weights(gram: Tensor) -> Tensor:
    r"""IMTL-G (Liu et al., ICLR 2021): the combination of the gradients, weights summing to 1,
    whose projections on every unit gradient ``u_i`` are equal.

    The paper's closed form (``alpha_{2:K} = g_1 U^T (D U^T)^{-1}`` with ``D`` the rows
    ``g_1 - g_i`` and ``U`` the rows ``u_1 - u_i``) solves the conditions
    ``<u_i, d> = lambda`` for every i and ``sum_i alpha_i = 1``, ``d = sum_j alpha_j g_j``:
    here the same conditions as one bordered system, ``[A, -1; 1^T, 0] [alpha; lambda] =
    [0; 1]`` with ``A_ij = <u_i, g_j> = M_ij / n_i``, which needs no reference task. A task whose
    gradient is zero has no direction to be fair to: it keeps the weight ``1 / K`` and the
    others share the rest. When the system is singular (two gradients of one direction) the
    projections are equal for a whole family of weights and the uniform weights are returned.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    norms, inverse = _norms(gram)
    present = norms > 0
    share = torch.full((num_tasks,), 1 / num_tasks, dtype=gram.dtype, device=gram.device)
    rows = torch.where(present[:, None], gram * inverse[:, None], torch.diag(1 - 0 * norms))
    border = torch.where(present, -1.0, 0.0)[:, None]
    system = torch.cat(
        [
            torch.cat([rows, border], dim=1),
            torch.cat([torch.ones_like(norms), torch.zeros_like(norms[:1])])[None, :],
        ]
    )
    rhs = torch.cat([torch.where(present, 0.0, share), torch.ones_like(norms[:1])])
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:num_tasks]
    usable = (info == 0) & alpha.isfinite().all()
    return torch.where(usable, alpha, share).to(dtype)


def _spectrum(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues, eigenvectors and the mask of the eigenvalues above rounding, of a symmetric
    positive semi-definite float64 matrix computed in ``dtype``: relative to the largest,
    ``K * max(1e-13, 10 eps)`` (a float32 Gram of dependent gradients leaves eigenvalues near
    1e-8 of the largest, which would otherwise count as directions)."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    significant = values > values.max() * matrix.shape[0] * max(1e-13, 10 * eps)
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
    values, vectors, significant = _spectrum(gram, dtype)
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
    values, vectors, significant = _spectrum(cosines, dtype)
    inverted = torch.where(significant, 1 / torch.where(significant, values, 1.0), 0.0)
    unit_weights = (vectors * inverted[None, :]) @ (vectors.T @ (inverse > 0).to(gram.dtype))
    length = (unit_weights @ cosines @ unit_weights).clamp_min(0).sqrt()
    direction = unit_weights / torch.where(length > 0, length, 1.0)  # on the unit gradients
    on_gradients = direction * inverse  # on the gradients themselves
    size = (gram @ on_gradients).sum()  # sum_i <g_i, ĝ_u>
    return (size * on_gradients).to(dtype)


# --- UPGrad and DualProj: projections onto the dual cone ---------------------------------------


def dual_cone_weights(gram: Tensor, preferences: Tensor) -> Tensor:
    """See ``_dual_cone_weights``; on a CPU above ``BATCHED_SOLVE_THREADED_MAX_TASKS`` tasks the
    batched factorisations run on one thread: MKL's threaded batched LU inside torch's threaded
    loop over the batch failed (``DLASWP`` parameter errors) and did not return at K = 256 on
    2 threads, where one thread takes 4 s."""
    if gram.device.type != "cpu" or gram.shape[0] <= BATCHED_SOLVE_THREADED_MAX_TASKS:
        return _dual_cone_weights(gram, preferences)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dual_cone_weights(gram, preferences)
    finally:
        torch.set_num_threads(threads)


BATCHED_SOLVE_THREADED_MAX_TASKS = 128


def _dual_cone_weights(gram: Tensor, preferences: Tensor) -> Tensor:
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
      On degenerate problems (a singular Gram: antiparallel tasks, more tasks than the
      gradients' rank) the free set can stay unclear; a projection whose candidates all fail
      the optimality conditions is then replaced by 0, which conflicts with no task (the
      update loses that projection's contribution rather than conflicting).

    Returns ``(B, K)`` weights, in the Gram's dtype.
    """
    dtype, gram = gram.dtype, _float64(gram)
    preferences = preferences.detach().to(gram.dtype)
    num_tasks = gram.shape[0]
    if num_tasks <= NNQP_ENUMERATION_MAX_TASKS:
        # Every face at once: 2^K x B systems of K x K (8 MiB at K = B = 10).
        candidates = _on_free_sets(gram, preferences, _all_subsets(num_tasks, gram))
        scores, feasible = _candidate_scores(gram, preferences, candidates)  # (S, B)
        best = _pick(candidates, scores, feasible)
        certified = feasible.any(dim=0)
    else:
        # One free set per problem at a time, keeping the best so far: B systems of K x K in
        # memory (K^3 numbers, 128 MiB at K = 256) rather than the T x B of every threshold at
        # once (T = 12: 6.4 GiB at K = 256, out of memory; 0.8 GiB at K = 128). Strictly
        # better only: ties keep the earlier set, as the batched argmin did.
        best = torch.zeros_like(preferences)
        best_score = torch.full_like(preferences[:, 0], torch.inf)
        certified = torch.zeros_like(best_score, dtype=torch.bool)
        early_exit = _host_reads_wait_for_nothing(gram)
        tried: list[Tensor] = []
        for free in _interior_point_supports(gram, preferences):  # (B, K) each
            # On a CPU, a threshold that gives the same free sets as an earlier one is skipped
            # (its systems would be solved again: 1.5 s at K = 256).
            if early_exit and any(torch.equal(free, seen) for seen in tried):
                continue
            tried.append(free)
            candidate = _on_free_sets(gram, preferences, free[None])  # (1, B, K)
            scores, feasible = _candidate_scores(gram, preferences, candidate)
            better = scores[0] < best_score
            best = torch.where(better[:, None], candidate[0], best)
            best_score = torch.where(better, scores[0], best_score)
            certified = certified | feasible[0]
            # A candidate that passes both conditions meets every KKT condition of the convex
            # problem (its free tasks have (M w)_F = 0 by construction): it is the optimum, and
            # the later thresholds cannot improve it. On a CPU, where reading this waits for
            # nothing, stop once every problem has one (the first set, at K = 256, usually).
            if early_exit and bool(certified.all()):
                break
    best = torch.maximum(best, preferences)
    # No candidate passed both conditions: a degenerate problem beyond the enumeration (see the
    # docstring). Zero weights give the zero update, which conflicts with no task.
    return torch.where(certified[:, None], best, 0.0).to(dtype)


def _candidate_scores(
    gram: Tensor, preferences: Tensor, candidates: Tensor
) -> tuple[Tensor, Tensor]:
    """For ``(S, B, K)`` candidates: the objective ``w^T M w`` where the candidate passes both
    optimality conditions (inf elsewhere), and whether it does; each ``(S, B)``."""
    scale = preferences.abs().sum(dim=1).clamp_min(1e-300)  # (B,)
    products = candidates @ gram  # <g_i, d> for each candidate, up to the norms
    norms, _ = _norms(gram)
    size = (candidates.abs() @ norms)[..., None] * norms  # bounds |<g_i, d>|
    # Both sides of the optimality conditions: the bounds, and no conflict (the optimum has
    # M w >= 0; a candidate that conflicts is not the projection, however small its objective).
    feasible = (candidates >= preferences - 1e-12 * scale[:, None]).all(dim=2) & (
        products >= -1e-11 * size
    ).all(dim=2)
    objectives = (products * candidates).sum(dim=2)
    return torch.where(feasible & objectives.isfinite(), objectives, torch.inf), feasible


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
    early_exit = _host_reads_wait_for_nothing(gram)
    previous, stalled = None, 0
    for _ in range(INTERIOR_POINT_ITERATIONS):
        residual = (pinned + slack) @ cosines - multipliers  # (B, K)
        gap = (slack * multipliers).sum(dim=1, keepdim=True) / num_tasks
        # A problem solved to rounding (gap below 1e-15 and residual below 1e-12, on the
        # cosines, whose diagonal is 1), or whose gap is below 1e-20 with a residual that no
        # longer falls (a rank-deficient Gram's stalls near 1e-8), keeps its point: further
        # steps drive x z towards 0 and into subnormal numbers, whose arithmetic made every
        # operation of the loop 10 to 50x slower on a CPU (5.5 ms for a min over 128 x 128).
        residual_size = residual.abs().amax(dim=1, keepdim=True)
        converged = ((gap < 1e-15) & (residual_size < 1e-12)) | (gap < 1e-20)
        # On a CPU, where a host read waits for nothing: stop once every problem is solved, or
        # once the largest gap and the largest residual have both shrunk by less than 1% for
        # three steps in a row (a rank-deficient Gram stalls near gap 4e-9, residual 6e-8,
        # after 13 steps at K = 128, and ran the other 47 for nothing). Elsewhere the fixed
        # count runs, without a synchronisation.
        if early_exit:
            sizes = torch.stack([gap.max(), residual_size.max()])
            stalled_now = previous is not None and bool((sizes >= 0.99 * previous).all())
            stalled = stalled + 1 if stalled_now else 0
            if bool(converged.all()) or stalled >= 3:
                break
            previous = sizes
        # Mehrotra's predictor-corrector: one factorisation of (C + diag(z / x)) per step and
        # two solves with it. Its steps reach the tolerance in about half the steps of a fixed
        # centring target (0.1 gap; 25 steps at K = 64 where this takes 12), and the
        # factorisations are the cost: B of K x K, 1.1 s a step at K = 256 on 2 CPU cores.
        # The system is built in place: a diag_embed of the (B, K) diagonals adds a second
        # B x K x K tensor (128 MiB at K = 256).
        system = cosines.expand(*slack.shape, num_tasks).clone()
        system.diagonal(dim1=-2, dim2=-1).add_(multipliers / slack)
        factors, pivots, _ = torch.linalg.lu_factor_ex(system)
        del system
        newton = (factors, pivots, residual, slack, multipliers)
        affine, affine_multipliers = _newton_direction(*newton, torch.zeros_like(slack))
        reach = torch.minimum(
            _to_boundary(slack, affine), _to_boundary(multipliers, affine_multipliers)
        )
        predicted = ((slack + reach * affine) * (multipliers + reach * affine_multipliers)).sum(
            dim=1, keepdim=True
        ) / num_tasks
        centring = (predicted / gap.clamp_min(1e-300)).clamp(0, 1) ** 3
        step, step_multipliers = _newton_direction(
            *newton, centring * gap - affine * affine_multipliers
        )
        reach = torch.minimum(
            _to_boundary(slack, step), _to_boundary(multipliers, step_multipliers)
        )
        slack_new = slack + 0.99 * reach * step
        multipliers_new = multipliers + 0.99 * reach * step_multipliers
        usable = (
            (slack_new > 0).all(dim=1, keepdim=True)
            & slack_new.isfinite().all(dim=1, keepdim=True)
            & multipliers_new.isfinite().all(dim=1, keepdim=True)
            & ~converged
        )
        slack = torch.where(usable, slack_new, slack)
        multipliers = torch.where(usable, multipliers_new, multipliers)
    # The free tasks are those whose slack beats its multiplier (strict complementarity);
    # degenerate problems (a singular Gram) leave both small, and the free set is then read
    # from the slacks alone, at several thresholds.
    ratio = slack / (slack + multipliers)
    largest = slack.max(dim=1, keepdim=True).values
    masks = [ratio > threshold for threshold in (0.5, *_POLISH_THRESHOLDS)]
    masks += [slack > threshold * largest for threshold in _POLISH_THRESHOLDS]
    masks.append(torch.zeros_like(slack, dtype=torch.bool))  # nothing free: w = u
    return torch.stack(masks).to(gram.dtype)


def _newton_direction(
    factors: Tensor,
    pivots: Tensor,
    residual: Tensor,
    slack: Tensor,
    multipliers: Tensor,
    target: Tensor,
) -> tuple[Tensor, Tensor]:
    """The steps ``(dx, dz)`` towards ``x z = target``: ``(C + diag(z / x)) dx = -residual +
    (target - x z) / x`` (``factors``, ``pivots``: its LU), then ``dz`` from
    ``x dz + z dx = target - x z``."""
    rhs = -residual + (target - slack * multipliers) / slack
    step = torch.linalg.lu_solve(factors, pivots, rhs[..., None])[..., 0]
    return step, (target - slack * multipliers - multipliers * step) / slack


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
    every face is tried (exact); beyond, a log-barrier interior point
    (``INTERIOR_POINT_ITERATIONS`` Newton steps) finds the optimal face and its closed form
    finishes the point.

    A task whose gradient is zero takes no part (no update can move its loss): its inner weight
    is 0. When the optimal ``g_w`` is 0 (the mean is already Pareto-stationary in the sense of
    the problem) the update is the mean, ``g_0``.

    Returned: the weights of ``d = sum_i w'_i g_i``, ``w' = 1/K + r w / ||g_w||``.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    uniform = torch.full((num_tasks,), 1 / num_tasks, dtype=gram.dtype, device=gram.device)
    linear = gram @ uniform
    radius = c * (uniform @ linear).clamp_min(0).sqrt()
    norms, _ = _norms(gram)
    present = (norms > 0).to(gram.dtype)
    if num_tasks == 1:
        weights = uniform
    else:
        if num_tasks <= NNQP_ENUMERATION_MAX_TASKS:
            faces = _all_subsets(num_tasks, gram)[1:] * present
            start = present[None] / present.sum().clamp_min(1)
        else:
            found = _cagrad_barrier(gram, linear, radius, present)
            start = found[None]
            largest = found.max()
            faces = torch.stack([found > t * largest for t in _POLISH_THRESHOLDS])
            faces = faces.to(gram.dtype)
        candidates = torch.cat([start, _cagrad_face_points(gram, linear, radius, faces)])
        objectives = candidates @ linear + radius * _quadratic(candidates, gram).sqrt()
        scores = torch.where(objectives.isfinite(), objectives, torch.inf)
        weights = candidates[scores.argmin().reshape(1)][0]
    length = (weights @ gram @ weights).clamp_min(0).sqrt()
    # ||g_w|| at rounding level of the largest gradient: g_w is 0, and so is the correction.
    significant = length > 1e-12 * norms.max()
    step = torch.where(significant, radius / torch.where(significant, length, 1.0), 0.0)
    return (uniform + step * weights).to(dtype)


def _cagrad_barrier(gram: Tensor, linear: Tensor, radius: Tensor, present: Tensor) -> Tensor:
    """A log-barrier path on ``F`` over the simplex of the present tasks: the minimiser of
    ``F(w) / mu - sum_i log w_i`` for ``mu`` halved at each of ``INTERIOR_POINT_ITERATIONS``
    Newton steps, each step with the equality ``1^T w = 1`` in its KKT system and the best of a
    batch of step lengths (no host synchronisation). Returns the last point."""
    num_tasks = gram.shape[0]
    scale = gram.diagonal().max()
    unit = torch.where(scale > 0, scale, 1.0)
    gram, linear, radius = gram / unit, linear / unit, radius / unit.sqrt()
    absent = 1 - present
    weights = present / present.sum().clamp_min(1)
    ones = torch.cat([present, torch.zeros_like(present[:1])])
    steps = 2.0 ** -torch.arange(16, dtype=gram.dtype, device=gram.device)
    level = (weights @ linear).abs() + radius * _quadratic(weights[None], gram)[0].sqrt() + 1e-3

    def barrier(points: Tensor, mu: Tensor) -> Tensor:
        value = points @ linear + radius * _quadratic(points, gram).sqrt()
        logs = torch.where(present > 0, torch.log(points.clamp_min(1e-300)), 0.0).sum(dim=-1)
        inside = ((points > 0) | (present == 0)).all(dim=-1)
        return torch.where(inside, value / mu - logs, torch.inf)

    for _ in range(INTERIOR_POINT_ITERATIONS):
        level = level / 2
        product = gram @ weights
        length = (weights @ product).clamp_min(1e-30).sqrt()
        safe = torch.where(present > 0, weights, 1.0)
        gradient = (linear + radius * product / length) / level - present / safe
        hessian = radius / level * (gram / length - torch.outer(product, product) / length**3)
        hessian = hessian * torch.outer(present, present) + torch.diag(
            present / safe.square() + absent
        )
        system = torch.cat([torch.cat([hessian, present[:, None]], dim=1), ones[None, :]], dim=0)
        rhs = torch.cat([-gradient * present, torch.zeros_like(gradient[:1])])
        solution, _ = torch.linalg.solve_ex(system, rhs)
        direction = solution[:num_tasks] * present
        points = weights[None] + steps[:, None] * direction[None]
        values = barrier(points, level)
        best = values.argmin().reshape(1)
        new = points[best][0]
        usable = values[best][0].isfinite() & new.isfinite().all()
        weights = torch.where(usable, new, weights)
    return weights * present


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


# --- Nash-MTL and FairGrad ----------------------------------------------------------------------


def fair_weights(gram: Tensor, alpha: float) -> Tensor:
    r"""The positive ``w`` with ``M w = w^{-1/alpha}`` (elementwise): FairGrad's condition (Ban &
    Ji, ICML 2024), and for ``alpha = 1`` Nash-MTL's ``G^T G w = 1 / w`` (Navon et al., ICML
    2022; here the rows of ``G`` are the task gradients).

    With ``n`` the norms and ``C`` the cosines, ``v = n w`` solves ``C v = k v^{-1/alpha}``,
    ``k_i = n_i^{1/alpha - 1}``: the stationary point of the strictly convex
    ``f(v) = v^T C v / 2 - sum_i k_i h(v_i)``, ``h'(v) = v^{-1/alpha}`` (``h = log`` at
    ``alpha = 1``). ``NEWTON_STEPS`` Newton steps find it, from the best multiple of the
    diagonal problem's solution ``v_i = k_i^{alpha / (1 + alpha)}``, each with the best of a
    batch of step lengths that keep ``v > 0``.
    Working on the cosines makes the problem independent of the gradients' scales (norms 100x
    apart leave the same conditioning). Linearly dependent gradients have no solution (f is
    unbounded below): a ridge of 1e-13 on the cosines' diagonal keeps the problem regular. A
    task whose gradient is zero cannot satisfy its equation and is left out, with weight 0.

    Scaling: for ``c M`` (gradients ``sqrt(c)`` times larger) the weights are
    ``c^{-alpha / (1 + alpha)}`` times those of ``M``. The problem is solved on
    ``M / s`` (``s = unit_scale(M)``, a power of two) and its weights scaled by that law.
    """
    dtype, unit, gram = gram.dtype, unit_scale(gram), _float64(gram)
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
    halvings = 2.0 ** -torch.arange(20, dtype=gram.dtype, device=gram.device)
    early_exit = _host_reads_wait_for_nothing(gram)
    scale = gram.diagonal().max()
    for _ in range(NEWTON_STEPS):
        gradient = cosines @ weights - pull * weights**exponent
        hessian = cosines + torch.diag(pull * weights ** (exponent - 1) / alpha)
        step, _ = torch.linalg.solve_ex(hessian, -gradient)
        # The best of a batch of step lengths (halvings from the largest that stays positive):
        # a line search without host synchronisation. Damped steps alone (1 / (1 + decrement))
        # left a residual of 8.8 after 60 steps on an ill-conditioned K = 64 Gram.
        longest = torch.minimum(
            torch.ones_like(scale), 0.9 * _to_boundary(weights[None], step[None])[0, 0]
        )
        points = weights[None] + (longest * halvings)[:, None] * step[None]
        values = _fair_potential(points, cosines, pull, alpha)
        # Near the optimum (a Newton decrement below 1/4) the full step, whose decrease the
        # potential's rounding can no longer tell apart from a shorter one's.
        decrement = (-(gradient @ step)).clamp_min(0).sqrt()
        best = torch.where(decrement < 0.25, 0, values.argmin()).reshape(1)
        new = points[best][0]
        usable = (
            (new > 0).all()
            & new.isfinite().all()
            & (
                (decrement < 0.25)
                | (values[best][0] <= _fair_potential(weights[None], cosines, pull, alpha)[0])
            )
        )
        weights = torch.where(usable, new, weights)
        # On a CPU a host read waits for nothing: stop once Newton's decrement is at rounding
        # level (8 to 12 steps on well-conditioned problems; about 0.4 ms a step at K = 8).
        # Elsewhere, and under torch.compile, the fixed count runs, without a synchronisation.
        if early_exit and bool(decrement < 1e-9):
            break
    weights = weights * unit ** (-alpha / (1 + alpha))
    return torch.where(present, weights * inverse, 0.0).to(dtype)


def _fair_potential(points: Tensor, cosines: Tensor, pull: Tensor, alpha: float) -> Tensor:
    """``v^T C v / 2 - sum_i k_i h(v_i)`` for each row of ``points`` (inf outside v > 0)."""
    quadratic = ((points @ cosines) * points).sum(dim=-1) / 2
    positive = points.clamp_min(1e-300)
    exponent = 1 - 1 / alpha
    utility = torch.log(positive) if alpha == 1 else positive**exponent / exponent
    value = quadratic - (pull * utility).sum(dim=-1)
    return torch.where((points > 0).all(dim=-1), value, torch.inf)


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


# --- robust aggregators: Krum and the trimmed mean --------------------------------------------


def krum_weights(gram: Tensor, byzantine: int, selected: int = 1) -> Tensor:
    r"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), from the Gram matrix.

    Each gradient's score is the sum of its squared distances to its ``K - f - 2`` nearest
    other gradients (``f``: ``byzantine``), ``||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij``; the
    ``m`` (``selected``) gradients of lowest score are averaged: ``w_i = 1 / m`` for them, 0
    for the others. Ties go to the lower task index (a stable sort), so the choice does not
    depend on the device's sort. Needs ``K >= f + 3``.
    """
    dtype, gram = gram.dtype, _float64(gram)
    num_tasks = gram.shape[0]
    diagonal = gram.diagonal()
    squared = (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min(0)
    # Each gradient is at distance 0 from itself: it sorts first in its row, and is skipped.
    squared = squared + torch.diag(torch.full_like(diagonal, -1.0))
    nearest = squared.sort(dim=1, stable=True).values[:, 1 : num_tasks - byzantine - 1]
    scores = nearest.sum(dim=1)
    chosen = scores.argsort(stable=True)[:selected]
    weights = torch.zeros_like(diagonal).index_fill(0, chosen, 1.0 / selected)
    return weights.to(dtype)


def trimmed_mean_update(task_grads: Tensor, trim: int) -> Tensor:
    r"""The coordinate-wise trimmed mean (Yin et al., ICML 2018) of the stacked gradients
    ``(K, P)``: at every coordinate the ``b`` (``trim``) largest and ``b`` smallest of the K
    values are removed and the other ``K - 2b`` averaged. Needs ``K >= 2b + 1``."""
    num_tasks = task_grads.shape[0]
    ordered = task_grads.sort(dim=0).values
    return ordered[trim : num_tasks - trim].mean(dim=0)


def smoothed_weights(previous: Tensor, weights: Tensor, alpha: float) -> Tensor:
    r"""CR-MOGM (Zhou et al., NeurIPS 2022): the weights of a gradient method smoothed over
    steps, ``lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda_hat_t``; a ``previous`` of NaN
    (no step yet) gives ``lambda_hat_t`` itself."""
    previous = previous.to(weights.dtype)
    blend = alpha * previous + (1 - alpha) * weights
    return torch.where(torch.isnan(previous), weights, blend)


# --- NTKMTL -----------------------------------------------------------------------------------


def ntk_weights(eigenvalues: Tensor, exponent: float = 0.5) -> Tensor:
    r"""NTKMTL (Qin et al., NeurIPS 2025), Eq. 15: each task weighted so that its neural
    tangent kernel's largest eigenvalue, scaled by ``w_i^2``, matches the mean,
    ``w_i = (mean_j lambda_j / lambda_i)^p`` (``p = 1/2`` in the paper). A task whose
    eigenvalue is 0 (no gradient) gets weight 0."""
    dtype = torch.promote_types(eigenvalues.dtype, torch.float32)
    values = eigenvalues.to(torch.float64)  # K numbers: the ratios of tiny kernels stay finite
    mean = values.mean()
    present = values > 0
    ratio = torch.where(present, mean / torch.where(present, values, 1.0), 0.0)
    weights = torch.where(present, ratio.pow(exponent), 0.0)
    return weights.clamp_max(torch.finfo(dtype).max).to(dtype)


def representation_ntk_eigenvalues(feature_grads: Tensor, chunks: int) -> Tensor:
    r"""NTKMTL-SR's eigenvalues from ``(K, B, ...)`` gradients of the K mean losses with
    respect to a shared representation whose first dimension is the batch: the batch split in
    ``chunks`` parts (``torch.chunk``), the kernel ``(K_i)_uv = <d l_i^(u)/dz, d l_i^(v)/dz>``
    of the parts' mean losses. Their gradients touch disjoint rows of ``z``, so the kernel is
    diagonal and its largest eigenvalue is the largest ``||d l_i^(u)/dz||^2``; the part's mean
    loss has ``B / |u|`` times the batch mean's gradient on its rows."""
    num_tasks, batch = feature_grads.shape[:2]
    # In float64: the squares of float32 gradients below 1e-19 would vanish.
    rows = feature_grads.reshape(num_tasks, batch, -1).to(torch.float64)
    squared = rows.square().sum(dim=2)  # (K, B)
    parts = [
        part.sum(dim=1) * (batch / part.shape[1]) ** 2 for part in squared.chunk(chunks, dim=1)
    ]
    return torch.stack(parts, dim=1).amax(dim=1)
