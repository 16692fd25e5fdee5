"""The math of fused_mtl in plain torch: the CPU fallback, the test oracle's counterpart, the eager
baseline of the benchmarks.

Every formula here reads like its paper. Each function is vectorised over the task axis (no Python
loop over tasks), differentiable by autograd, and works in any floating dtype; half-precision
inputs are computed in float32 and the result is cast back, exactly like the Triton kernels do.

Split by family:

- ``uncertainty``: the uncertainty-weighting forms (Kendall et al., Liebel & Koerner, the
  dynamic-noise form), their bounds and autograd rule;
- ``gram``: the Gram matrix and norms of the per-task gradients;
- ``statistics``: weights from loss and metric statistics (GradNorm's rule, DWA, DTP);
- ``solvers``: MGDA's min-norm solver on the Gram matrix;
- ``gram_weights``: the Gram family's weights (PCGrad, CAGrad, UPGrad, Nash-MTL, ...);
- ``loss_weights``: the loss-level methods' totals and weights (FAMO, RLW, GLS, STCH);
- ``stochastic``: the stochastic gradient methods' steps (MoCo, SDMGrad, MoDo, ExcessMTL).
"""

from fused_mtl.reference.gram import task_grad_norms, task_gram
from fused_mtl.reference.solvers import (
    ENUMERATION_MAX_TASKS,
    INTERIOR_POINT_ITERATIONS,
    MGDA_NORMALIZATIONS,
    gradient_scales,
    min_norm_weights,
)
from fused_mtl.reference.statistics import (
    dtp_weights,
    dwa_weights,
    gradnorm_weight_grad,
    renormalized_weights,
)
from fused_mtl.reference.uncertainty import (
    LOG_VARIANCE_BOUNDS,
    TASK_TYPE_COEFFICIENTS,
    Parametrization,
    check_log_var_bounds,
    compute_dtype,
    parameter_bounds,
    result_dtype,
    task_type_coefficients,
    total_in_parameter_range,
    uncertainty_terms,
    uncertainty_total,
    uncertainty_weights,
)

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
