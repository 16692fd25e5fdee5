"""The uncertainty-weighting forms in plain torch.

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
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


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
