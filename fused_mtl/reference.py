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

Each parameter stands for a variance: ``sigma_i^2 = e^{s_i} = p_i^2 = eta_i^2``. The objective has
no minimum when a loss is zero or negative (an NLL can be): ``sigma_i^2 -> 0`` drives the term to
minus infinity. Every form therefore keeps the variance in a bounded range,
``log sigma_i^2`` in ``LOG_VARIANCE_BOUNDS`` = [-20, 20] unless chosen otherwise: the parameter
is clamped there (for ``p`` and ``eta``, their magnitude: the terms depend on ``p^2``, and
``log |eta|`` extends ``log eta`` to either sign), and its gradient is dropped where it would push
a parameter that is already outside further out, so that a parameter that overshot comes back
when the losses allow it. Inside the range nothing changes: the values and gradients are those
of the formulas, bit for bit.

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

Dynamic Weight Average
----------------------
DWA (Liu, Johns & Davison, CVPR 2019) weights the losses of period t by how fast each fell over
the two periods before: with ``L^_n(e)`` task n's mean training loss over period e,
``r_n = L^_n(t-1) / L^_n(t-2)`` and temperature T, ``w_i = K exp(r_i / T) / sum_n exp(r_n / T)``.
The weights sum to K; a task whose loss fell least gets the largest weight.

Dynamic Task Prioritization
---------------------------
DTP (Guo et al., ECCV 2018), at task level, weights each loss by a focal term of a key
performance indicator ``k_i`` in [0, 1] (accuracy, IoU, ...) smoothed over time:
``w_i = -(1 - k_i)^gamma_i log(k_i)``. A task that performs badly (small ``k_i``) is weighted up.

MGDA
----
MGDA (Sener & Koltun, NeurIPS 2018) takes the point of the convex hull of the task gradients
with the smallest norm: ``alpha = argmin_{alpha in simplex} ||sum_i alpha_i g_i||^2``, which needs
only the Gram matrix ``M``: the objective is ``alpha^T M alpha``. The gradients may first be
normalised, ``g_i / c_i``, which turns ``M`` into ``M_ik / (c_i c_k)``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "ENUMERATION_MAX_TASKS",
    "INTERIOR_POINT_ITERATIONS",
    "LOG_VARIANCE_BOUNDS",
    "MGDA_NORMALIZATIONS",
    "TASK_TYPE_COEFFICIENTS",
    "Parametrization",
    "check_log_var_bounds",
    "compute_dtype",
    "dtp_weights",
    "dwa_weights",
    "gradient_scales",
    "gradnorm_weight_grad",
    "min_norm_weights",
    "parameter_bounds",
    "renormalized_weights",
    "result_dtype",
    "task_grad_norms",
    "task_gram",
    "task_type_coefficients",
    "total_in_parameter_range",
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


#: The range of ``log sigma^2`` that every uncertainty form keeps its parameter in (see the
#: module docstring): a weight of at most e^20 = 4.9e8, reached only by a loss of 2e-9 or less
#: at the optimum of the log-variance form (``s* = log L``), and finite totals and gradients for
#: any loss below 1e29 in magnitude.
LOG_VARIANCE_BOUNDS = (-20.0, 20.0)


#: The widest range ``log_var_bounds`` may ask for: weights up to e^80 = 5.5e34 and parameter
#: bounds up to e^40 still fit float32 (3.4e38).
MAX_LOG_VAR_BOUND = 80.0


def check_log_var_bounds(bounds: object) -> tuple[float, float]:
    """``(lower, upper)``: two finite numbers, ``lower < upper``."""
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in bounds
        )
    ):
        raise TypeError(f"log_var_bounds must be a pair (lower, upper) of numbers, got {bounds!r}")
    lower, upper = float(bounds[0]), float(bounds[1])
    if not (-MAX_LOG_VAR_BOUND <= lower < upper <= MAX_LOG_VAR_BOUND):
        raise ValueError(
            f"log_var_bounds must satisfy -{MAX_LOG_VAR_BOUND:g} <= lower < upper <= "
            f"{MAX_LOG_VAR_BOUND:g} (every form's weight then fits float32), got "
            f"({lower}, {upper})"
        )
    return lower, upper


def parameter_bounds(
    parametrization: Parametrization, log_var_bounds: tuple[float, float] = LOG_VARIANCE_BOUNDS
) -> tuple[float, float]:
    """The range of the parameter itself (of its magnitude for ``p`` and ``eta``)."""
    lower, upper = log_var_bounds
    if parametrization == Parametrization.LOG_VARIANCE:
        return float(lower), float(upper)
    return math.exp(lower / 2), math.exp(upper / 2)


def result_dtype(losses: Tensor, params: Tensor) -> torch.dtype:
    """The dtype of the total: torch's promotion of the loss and parameter dtypes."""
    return torch.promote_types(losses.dtype, params.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32; float32 and float64 in themselves."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bounded(
    params: Tensor, parametrization: Parametrization, lower: float, upper: float
) -> Tensor:
    """The parameters clamped to their range (for ``p`` and ``eta`` their magnitude, the sign
    kept: sign(q) |q| is q exactly, and -0.0 counts as positive)."""
    if parametrization == Parametrization.LOG_VARIANCE:
        return params.clamp(lower, upper)
    sign = torch.where(params < 0, -1.0, 1.0).to(params.dtype)
    return sign * params.abs().clamp(lower, upper)


def _formula(
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-task weight ``w_i`` and regulariser ``r_i`` with ``term_i = w_i * L_i + r_i``."""
    if parametrization == Parametrization.LOG_VARIANCE:
        weights = params.neg().exp_()  # one buffer instead of two
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
        # log |eta|: eta enters squared elsewhere, and its sign is the parameter's choice.
        regularisers = torch.log(params.abs())
    else:
        raise ValueError(f"unknown parametrization {parametrization!r}")
    return weights, regularisers


def _slopes(
    params: Tensor,
    losses: Tensor,
    weights: Tensor,
    parametrization: Parametrization,
    reg_coefs: Tensor | None,
) -> Tensor:
    """``d term_i / d q_i``: ``b - w L``, ``2p / (1 + p^2) - 2 w L / p``, ``(1 - 2 w L) / eta``."""
    if parametrization == Parametrization.LOG_VARIANCE:
        regulariser = 1.0 if reg_coefs is None else reg_coefs.to(params.dtype)
        return regulariser - weights * losses
    if parametrization == Parametrization.LIEBEL_KOERNER:
        return 2 * params / (1 + params**2) - 2 * weights * losses / params
    return 1 / params - 2 * weights * losses / params


def _outward(params: Tensor, bounded: Tensor, gradient: Tensor) -> Tensor:
    """Where a gradient step (``-gradient``) would push a parameter outside its range further
    out. ``params - bounded`` is negative below the range, positive above it and 0 inside (for
    ``p`` and ``eta`` it carries their sign), so the step points out where its product with the
    gradient is negative: three operations instead of the six of the two-sided test."""
    return (params - bounded) * gradient < 0


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # A no-op .to() still costs a dispatch (about 2 us on a CPU); the total makes up to eight.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _UncertaintyTotal(torch.autograd.Function):
    """The total as one autograd node with its gradients written out, and the bound's rule
    applied to the actual gradient.

    Autograd over the formula records five or more nodes, and the rule as ops of their own
    doubled the time of a forward + backward (105 -> 208 us at K = 2 on one CPU thread); here
    the forward is four ops (clamp, exp, addcmul, sum) and the backward four or five. Tensors
    made inside the forward are kept on ``ctx`` (nobody else holds them, so nothing can change
    them in place); the inputs go through ``save_for_backward`` and its version check. The
    backward recomputes with differentiable torch ops when a graph of it is asked for
    (``create_graph=True``), so that second derivatives are true."""

    @staticmethod
    def forward(ctx, losses, params, config):
        # config = (parametrization, loss_coefs, reg_coefs, lower, upper), one argument:
        # apply() inspects each argument, about 1 us apiece.
        parametrization, loss_coefs, reg_coefs, lower, upper = config
        dtype = compute_dtype(result_dtype(losses, params))
        computed = _as(params, dtype)
        bounded = _bounded(computed, parametrization, lower, upper)
        total, weights = _summed_terms(losses, bounded, parametrization, loss_coefs, reg_coefs)
        ctx.save_for_backward(losses, params)
        ctx.bounded, ctx.weights, ctx.offsets = bounded, weights, computed - bounded
        ctx.config = config
        return _as(total, result_dtype(losses, params))

    @staticmethod
    def backward(ctx, grad_total):
        losses, params = ctx.saved_tensors
        parametrization, loss_coefs, reg_coefs, lower, upper = ctx.config
        bounded, weights, offsets = ctx.bounded, ctx.weights, ctx.offsets
        dtype = compute_dtype(result_dtype(losses, params))
        computed_losses = _as(losses, dtype)
        if torch.is_grad_enabled():
            # create_graph=True: the same values, as a function of the parameters.
            bounded = _bounded(_as(params, dtype), parametrization, lower, upper)
            weights, _ = _formula(bounded, parametrization, loss_coefs, reg_coefs)
        upstream = _as(grad_total, dtype)
        grad_losses = upstream * weights
        if parametrization == Parametrization.LOG_VARIANCE:
            # upstream * (b - w L) as one op: b * upstream - (upstream * w) * L.
            scaled = upstream if reg_coefs is None else upstream * _as(reg_coefs, dtype)
            grad_params = torch.addcmul(scaled, grad_losses, computed_losses, value=-1)
        else:
            slopes = _slopes(bounded, computed_losses, weights, parametrization, reg_coefs)
            grad_params = upstream * slopes
        # The bound's rule (see _outward); offsets are 0 inside the range.
        grad_params = grad_params.masked_fill_(offsets * grad_params < 0, 0.0)
        return _as(grad_losses, losses.dtype), _as(grad_params, params.dtype), None


def uncertainty_terms(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    reg_coefs: Tensor | None = None,
    log_var_bounds: tuple[float, float] = LOG_VARIANCE_BOUNDS,
) -> Tensor:
    """Per-task terms ``w_i * L_i + r_i`` (shape ``(K,)``) in the compute dtype, from plain
    differentiable ops: what ``torch.compile`` traces and ``torch.func`` transforms.

    The bound's rule is decided from the sign of ``d term_i / d q_i``, as for a total that is
    minimised (a positive upstream gradient: ``backward()``, a ``GradScaler``'s scale).
    """
    dtype = compute_dtype(result_dtype(losses, params))
    losses, params = losses.to(dtype), params.to(dtype)
    lower, upper = parameter_bounds(parametrization, log_var_bounds)
    with torch.no_grad():
        bounded = _bounded(params, parametrization, lower, upper)
        weights, _ = _formula(bounded, parametrization, loss_coefs, reg_coefs)
        slopes = _slopes(bounded, losses, weights, parametrization, reg_coefs)
        kept = ~_outward(params, bounded, slopes)
    # The value is the bounded one (inside the range: params itself, bit for bit); the gradient
    # reaches params where it is kept.
    params = bounded + (params - params.detach()) * kept
    weights, regularisers = _formula(params, parametrization, loss_coefs, reg_coefs)
    return weights * losses + regularisers


def uncertainty_total(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    reg_coefs: Tensor | None = None,
    log_var_bounds: tuple[float, float] = LOG_VARIANCE_BOUNDS,
) -> Tensor:
    """The balanced total ``sum_i term_i`` (0-dim, in the promoted dtype of losses and params).

    In eager mode one autograd node with the gradients written out; under ``torch.compile`` or
    a ``torch.func`` transform the plain ops of ``uncertainty_terms``.
    """
    parametrization = Parametrization(parametrization)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        terms = uncertainty_terms(
            losses, params, parametrization, loss_coefs, reg_coefs, log_var_bounds
        )
        return terms.sum().to(result_dtype(losses, params))
    lower, upper = parameter_bounds(parametrization, log_var_bounds)
    return total_in_parameter_range(
        losses, params, parametrization, loss_coefs, reg_coefs, lower, upper
    )


def total_in_parameter_range(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
    lower: float,
    upper: float,
) -> Tensor:
    """``uncertainty_total`` (eager) with the parameter's own range, as ``parameter_bounds``
    gives it and the kernels take it.

    On a CPU, when every parameter is inside its range, autograd's own nodes over the formula:
    the rule then drops nothing, so values and gradients are the formula's either way, and
    four native nodes cost less than the one Python node, whose call alone is 0.8x the bare
    expression's forward + backward. Reading the parameters there costs a microsecond and
    waits for no device. On other devices (a host read would wait for the device and break
    CUDA graphs) and outside the range, the node with the rule written out.
    """
    parametrization = Parametrization(parametrization)
    if params.device.type == "cpu" and _inside(params, parametrization, lower, upper):
        return _formula_total(losses, params, parametrization, loss_coefs, reg_coefs)
    config = (parametrization, loss_coefs, reg_coefs, lower, upper)
    return _UncertaintyTotal.apply(losses, params, config)


def _inside(params: Tensor, parametrization: Parametrization, lower: float, upper: float) -> bool:
    """Whether every parameter (its magnitude, for ``p`` and ``eta``) is in its range; False
    for NaN."""
    magnitudes = params.detach()
    if parametrization != Parametrization.LOG_VARIANCE:
        magnitudes = magnitudes.abs()
    smallest, largest = torch.aminmax(magnitudes)
    return lower <= float(smallest) and float(largest) <= upper


def _formula_total(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
) -> Tensor:
    """``sum_i w_i L_i + r_i`` over plain differentiable ops, the parameters unclamped."""
    computed = _as(params, compute_dtype(result_dtype(losses, params)))
    total, _ = _summed_terms(losses, computed, parametrization, loss_coefs, reg_coefs)
    return _as(total, result_dtype(losses, params))


def _summed_terms(
    losses: Tensor,
    params: Tensor,
    parametrization: Parametrization,
    loss_coefs: Tensor | None,
    reg_coefs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``sum_i w_i L_i + r_i`` in the dtype of ``params`` (the compute dtype), and ``w``."""
    weights, regularisers = _formula(params, parametrization, loss_coefs, reg_coefs)
    return torch.addcmul(regularisers, weights, _as(losses, params.dtype)).sum(), weights


def uncertainty_weights(
    params: Tensor,
    parametrization: Parametrization = Parametrization.LOG_VARIANCE,
    loss_coefs: Tensor | None = None,
    log_var_bounds: tuple[float, float] = LOG_VARIANCE_BOUNDS,
) -> Tensor:
    """The effective weight ``w_i = dTotal / dL_i`` that multiplies each task loss."""
    lower, upper = parameter_bounds(parametrization, log_var_bounds)
    bounded = _bounded(params, parametrization, lower, upper)
    weights, _ = _formula(bounded, parametrization, loss_coefs, None)
    return weights


#: Elements of a half-precision gradient matrix upcast at a time (8 MiB of float32, 2^18
#: columns at K = 8). A whole-matrix upcast writes a fresh float32 copy on every call (32 MiB
#: for 8 x 1M bfloat16), and fresh memory is what costs: the Gram took 4.0x and the norms 13.8x
#: their float32 time on a CPU. Chunks copied into one reused buffer brought both to about
#: 1.5x (measured from 2^13 to 2^20 columns: 3.6x at 2^13, 1.5x at 2^18, 13x at 2^20).
UPCAST_CHUNK_ELEMENTS = 1 << 21


def _task_matrices(task_grads: Sequence[Tensor]) -> Iterator[Tensor]:
    """Each ``(K, *param.shape)`` gradient as ``(K, P_j)`` column blocks in the compute dtype:
    float32 and float64 matrices whole, half-precision ones a chunk of columns at a time.

    A generator, whose consumer uses each block before asking for the next: half-precision
    chunks are copied into one buffer, rewritten for every chunk. Where autograd may need the
    blocks (an input requires grad) or torch.compile traces, each chunk is a new tensor.
    """
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in task_grads) else torch.float32
    reuse = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(g.requires_grad for g in task_grads)
    )
    buffer: Tensor | None = None
    for grad in task_grads:
        matrix = grad.reshape(grad.shape[0], -1)
        if matrix.dtype == dtype:
            yield matrix
            continue
        rows, columns = matrix.shape
        chunk = max(1, UPCAST_CHUNK_ELEMENTS // max(rows, 1))
        for start in range(0, columns, chunk):
            block = matrix[:, start : start + chunk]
            if not reuse:
                yield block.to(dtype)
                continue
            if buffer is None or buffer.shape[0] != rows or buffer.device != matrix.device:
                buffer = torch.empty(rows, chunk, dtype=dtype, device=matrix.device)
            target = buffer[:, : block.shape[1]]
            target.copy_(block)
            yield target


def task_gram(task_grads: Sequence[Tensor]) -> Tensor:
    """``M = sum_j G_j G_j^T``, shape ``(K, K)``: float64 if any input is, else float32.

    Exactly symmetric, as the Triton path's: the lower triangle is the upper one mirrored (a
    matrix product ``G G^T`` rounds its two triangles apart, by 2.7e-5 at K = 8, P = 4097 with
    entries near 4e3).
    """
    gram = sum(m @ m.T for m in _task_matrices(task_grads))
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


def task_grad_norms(task_grads: Sequence[Tensor]) -> Tensor:
    """``||g_i||``, shape ``(K,)``: the square root of the Gram's diagonal, in its dtype.

    The squares are summed in the compute dtype, on this path and on the Triton one: in float32
    a norm is exact to rounding (1.5e-7 relative) from 1e-18 to 1.8e19; beyond 1.8e19 the sum of
    squares overflows (inf), and below 1e-18 the squares turn subnormal (relative errors of
    2.7e-6 at a norm of 1e-19, 2.6e-4 at 1e-20, 1e-2 at 1e-21; 0 once every element is below
    4e-23). Measured with rows of 100 equal elements. Gradients this large or small are out of
    reach of float32 training anyway; float64 gradients are exact far beyond (1e-154 to 1e154).
    """
    # The norm of the per-block norms; vector_norm's gradient at a zero norm is zero.
    per_block = [torch.linalg.vector_norm(m, dim=1) for m in _task_matrices(task_grads)]
    return torch.linalg.vector_norm(torch.stack(per_block), dim=0)


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


def dwa_weights(last_means: Tensor, before_last_means: Tensor, temperature: float) -> Tensor:
    """DWA's weights from the mean losses of the last two periods (``t-1`` and ``t-2``)."""
    rates = last_means / before_last_means
    return rates.shape[0] * torch.softmax(rates / temperature, dim=0)


def dtp_weights(kpis: Tensor, gamma: Tensor, kpi_floor: float) -> Tensor:
    """DTP's focal weights ``-(1 - k)^gamma log k``; ``k`` is raised to ``kpi_floor`` first.

    Without the floor a KPI of 0 would give an infinite weight; with it the weight is at most
    ``-log(kpi_floor)``. A KPI of 1 gives a weight of 0 (1 for ``gamma = 0``: torch's 0^0 = 1).
    """
    kpis = kpis.clamp_min(kpi_floor)
    return -((1 - kpis) ** gamma) * torch.log(kpis)


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
