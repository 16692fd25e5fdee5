"""Fused uncertainty weighting: one launch for the total, one launch for both gradients.

For K tasks with losses ``L`` and per-task parameters ``q`` the total is ``sum_i w_i * L_i + r_i``
where (see ``fused_mtl.reference``)

==================  ======================  ===================  ==========================
parametrisation     weight ``w_i``          regulariser ``r_i``  ``d term_i / d q_i``
==================  ======================  ===================  ==========================
LOG_VARIANCE (0)    ``a_i * exp(-s_i)``     ``b_i * s_i``        ``b_i - w_i L_i``
LIEBEL_KOERNER (1)  ``0.5 / p_i^2``         ``log(1 + p_i^2)``   ``2p_i/(1+p_i^2) - 2w_i L_i/p_i``
DYNAMIC_NOISE (2)   ``1 / eta_i^2``         ``log(eta_i)``       ``1/eta_i - 2w_i L_i/eta_i``
==================  ======================  ===================  ==========================

and ``d term_i / d L_i = w_i`` in every case. The parametrisation is a constexpr, so each variant
compiles to straight-line code with no branch at run time.

Each parameter is first clamped to its range ``[lower, upper]`` (of its magnitude for ``p`` and
``eta``, whose sign is kept), and its gradient is zeroed where a gradient step would move a
parameter that is already outside further out: the rule of ``fused_mtl.reference``, which
keeps the variance bounded when a loss is zero or negative. Inside the range the arithmetic is
unchanged.

Every value is loaded, computed and summed in float32 whatever the storage dtype (fp16, bf16 or
fp32), then cast once on store; this also keeps the kernels inside what the Triton interpreter
supports (no bf16 arithmetic, no libdevice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fused_mtl.kernels._launch import on_device_of

# A forward of K <= 65,536 tasks reads at most 3 * 256 KiB: a single program looping over blocks
# finishes in a few microseconds, well under the ~5 us a second launch would cost, and it sums in
# a fixed order, so the total is bitwise reproducible without atomics or a second reduction pass.
_MAX_FORWARD_BLOCK = 2048
_MAX_BACKWARD_BLOCK = 1024
# One warp's 32 lanes: a smaller block runs on the same warp with lanes left idle, so it would
# only add compiled variants (one per power of two of K below 32).
_MIN_BLOCK = 32


@triton.jit
def _weight_and_regulariser(params, loss_coefs, reg_coefs, PARAMETRIZATION: tl.constexpr):
    """Per-task ``w`` and ``r`` of ``term = w * L + r`` (fp32 in, fp32 out)."""
    if PARAMETRIZATION == 0:
        weight = loss_coefs * tl.exp(-params)
        regulariser = reg_coefs * params
    elif PARAMETRIZATION == 1:
        square = params * params
        weight = 0.5 / square
        regulariser = tl.log(1.0 + square)
    else:
        weight = 1.0 / (params * params)
        regulariser = tl.log(tl.abs(params))
    return weight, regulariser


@triton.jit
def _bounded(params, lower, upper, PARAMETRIZATION: tl.constexpr):
    """The parameters clamped to their range (for p and eta their magnitude, the sign kept)."""
    if PARAMETRIZATION == 0:
        return tl.minimum(tl.maximum(params, lower), upper)
    sign = tl.where(params < 0.0, -1.0, 1.0)
    return sign * tl.minimum(tl.maximum(tl.abs(params), lower), upper)


@triton.jit
def _load_task_block(
    losses_ptr, params_ptr, loss_coefs_ptr, reg_coefs_ptr, offsets, mask, HAS_COEFS: tl.constexpr
):
    """Load one block of tasks as fp32. Masked-off lanes get ``L = 0`` and ``q = 1`` so that
    ``log(q)`` and ``1 / q^2`` stay finite there (they are zeroed before any sum)."""
    losses = tl.load(losses_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    params = tl.load(params_ptr + offsets, mask=mask, other=1.0).to(tl.float32)
    if HAS_COEFS:
        loss_coefs = tl.load(loss_coefs_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        reg_coefs = tl.load(reg_coefs_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        loss_coefs = 1.0
        reg_coefs = 1.0
    return losses, params, loss_coefs, reg_coefs


# K is not specialised on (Triton would compile one variant for K % 16 == 0 and one for the rest):
# the loads are a few hundred bytes, so their vector width changes nothing next to the launch.
@triton.jit(do_not_specialize=["num_tasks"])
def _uncertainty_forward_kernel(
    losses_ptr,  # (K,) task losses, contiguous
    params_ptr,  # (K,) per-task parameters s / p / eta, contiguous
    loss_coefs_ptr,  # (K,) a_i of the log-variance form, read only if HAS_COEFS
    reg_coefs_ptr,  # (K,) b_i of the log-variance form, read only if HAS_COEFS
    total_ptr,  # () output, in the promoted dtype of losses and params
    num_tasks,  # K
    lower,  # range of the parameter (of its magnitude for p and eta), fp32
    upper,
    PARAMETRIZATION: tl.constexpr,  # 0 log-variance, 1 Liebel-Koerner, 2 dynamic noise
    HAS_COEFS: tl.constexpr,  # False: a_i = b_i = 1, the coefficient pointers are not read
    BLOCK_K: tl.constexpr,  # tasks per loop iteration
):
    """One program sums every task's term: ``total = sum_i w_i * L_i + r_i``."""
    partial = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for block_start in range(0, num_tasks, BLOCK_K):
        offsets = block_start + tl.arange(0, BLOCK_K)
        mask = offsets < num_tasks
        losses, params, loss_coefs, reg_coefs = _load_task_block(
            losses_ptr, params_ptr, loss_coefs_ptr, reg_coefs_ptr, offsets, mask, HAS_COEFS
        )
        params = _bounded(params, lower, upper, PARAMETRIZATION)
        weight, regulariser = _weight_and_regulariser(
            params, loss_coefs, reg_coefs, PARAMETRIZATION
        )
        partial += tl.where(mask, weight * losses + regulariser, 0.0)
    total = tl.sum(partial, axis=0)
    tl.store(total_ptr, total.to(total_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["num_tasks"])
def _uncertainty_backward_kernel(
    grad_total_ptr,  # () upstream gradient of the total
    losses_ptr,  # (K,) task losses, contiguous
    params_ptr,  # (K,) per-task parameters, contiguous
    loss_coefs_ptr,  # (K,) a_i, read only if HAS_COEFS
    reg_coefs_ptr,  # (K,) b_i, read only if HAS_COEFS
    grad_losses_ptr,  # (K,) output d total / d L, in the losses' dtype
    grad_params_ptr,  # (K,) output d total / d q, in the parameters' dtype
    num_tasks,  # K
    lower,  # range of the parameter (of its magnitude for p and eta), fp32
    upper,
    PARAMETRIZATION: tl.constexpr,
    HAS_COEFS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # tasks per program
):
    """Each program writes both gradients for its block of tasks; no reduction is needed."""
    offsets = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offsets < num_tasks
    # The upstream gradient is read on the device: no host synchronisation, capturable in a graph.
    grad_total = tl.load(grad_total_ptr).to(tl.float32)
    losses, params, loss_coefs, reg_coefs = _load_task_block(
        losses_ptr, params_ptr, loss_coefs_ptr, reg_coefs_ptr, offsets, mask, HAS_COEFS
    )
    bounded = _bounded(params, lower, upper, PARAMETRIZATION)
    # params - bounded is < 0 below the range, > 0 above it, 0 inside (signed for p and eta).
    offset = params - bounded
    params = bounded
    weight, _ = _weight_and_regulariser(params, loss_coefs, reg_coefs, PARAMETRIZATION)
    if PARAMETRIZATION == 0:
        grad_params = reg_coefs - weight * losses
    elif PARAMETRIZATION == 1:
        grad_params = 2.0 * params / (1.0 + params * params) - 2.0 * weight * losses / params
    else:
        grad_params = 1.0 / params - 2.0 * weight * losses / params
    grad_params = grad_total * grad_params
    # A step (-grad) pushes an outside parameter further out where offset * grad < 0: zero it.
    grad_params = tl.where(offset * grad_params < 0.0, 0.0, grad_params)
    tl.store(
        grad_losses_ptr + offsets,
        (grad_total * weight).to(grad_losses_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        grad_params_ptr + offsets,
        grad_params.to(grad_params_ptr.dtype.element_ty),
        mask=mask,
    )


def _num_warps(block: int) -> int:
    # One warp covers 32 lanes; beyond 8 warps a block this small only adds scheduling cost.
    return max(1, min(8, block // 256))


def _coefficient_pointers(
    params: torch.Tensor, loss_coefs: torch.Tensor | None, reg_coefs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if loss_coefs is None or reg_coefs is None:
        # Placeholders that the kernel never reads (HAS_COEFS is False).
        return params, params, False
    return loss_coefs.contiguous(), reg_coefs.contiguous(), True


def uncertainty_forward(
    losses: torch.Tensor,
    params: torch.Tensor,
    loss_coefs: torch.Tensor | None,
    reg_coefs: torch.Tensor | None,
    parametrization: int,
    lower: float,
    upper: float,
) -> torch.Tensor:
    """Launch the forward kernel once; return the 0-dim total."""
    losses, params = losses.contiguous(), params.contiguous()
    loss_coefs, reg_coefs, has_coefs = _coefficient_pointers(params, loss_coefs, reg_coefs)
    num_tasks = losses.numel()
    total = torch.empty(
        (), dtype=torch.promote_types(losses.dtype, params.dtype), device=losses.device
    )
    block = min(max(triton.next_power_of_2(num_tasks), _MIN_BLOCK), _MAX_FORWARD_BLOCK)
    with on_device_of(losses):
        _uncertainty_forward_kernel[(1,)](
            losses,
            params,
            loss_coefs,
            reg_coefs,
            total,
            num_tasks,
            lower,
            upper,
            PARAMETRIZATION=parametrization,
            HAS_COEFS=has_coefs,
            BLOCK_K=block,
            num_warps=_num_warps(block),
        )
    return total


def uncertainty_backward(
    grad_total: torch.Tensor,
    losses: torch.Tensor,
    params: torch.Tensor,
    loss_coefs: torch.Tensor | None,
    reg_coefs: torch.Tensor | None,
    parametrization: int,
    lower: float,
    upper: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel once; return ``(grad_losses, grad_params)``."""
    losses, params = losses.contiguous(), params.contiguous()
    loss_coefs, reg_coefs, has_coefs = _coefficient_pointers(params, loss_coefs, reg_coefs)
    num_tasks = losses.numel()
    grad_losses = torch.empty_like(losses)
    grad_params = torch.empty_like(params)
    block = min(max(triton.next_power_of_2(num_tasks), _MIN_BLOCK), _MAX_BACKWARD_BLOCK)
    with on_device_of(losses):
        _uncertainty_backward_kernel[(triton.cdiv(num_tasks, block),)](
            grad_total,
            losses,
            params,
            loss_coefs,
            reg_coefs,
            grad_losses,
            grad_params,
            num_tasks,
            lower,
            upper,
            PARAMETRIZATION=parametrization,
            HAS_COEFS=has_coefs,
            BLOCK_K=block,
            num_warps=_num_warps(block),
        )
    return grad_losses, grad_params
