"""Op layer of the per-task gradient Gram matrix and norms: checks, dispatch and autograd.

Both ops take the per-task gradients of the shared parameters as a sequence of tensors shaped
``(K, *param.shape)`` (or one ``(K, P)`` matrix) and view each as a ``(K, P_j)`` matrix without a
copy. On the Triton path one launch reads every matrix (see ``fused_mtl.kernels.gram``); the torch
path is ``fused_mtl.reference``. As with uncertainty weighting, eager calls go through an
``autograd.Function`` and ``torch.compile`` sees the registered op ``fused_mtl::task_gram``.

Gradients (written from the math, built from torch ops so that they can be differentiated again):
``d||g_i|| / dg_i = g_i / ||g_i||`` (zero where the norm is zero) and, for ``M = G G^T``,
``dL/dG = (dL/dM + dL/dM^T) G``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl.ops.backend import Backend, resolve_backend

TaskGrads = Tensor | Sequence[Tensor]


def task_matrices(task_grads: TaskGrads) -> list[Tensor]:
    """Check the per-task gradients and view each as a ``(K, P_j)`` matrix with unit stride."""
    if isinstance(task_grads, Tensor):
        if task_grads.dim() < 2:
            raise ValueError(
                f"task_grads: a single tensor must be a (K, P) matrix (or (K, *param.shape)), "
                f"got shape {tuple(task_grads.shape)}; for one parameter's gradients of shape "
                "(K,) pass them in a list"
            )
        task_grads = [task_grads]
    elif not isinstance(task_grads, Sequence) or isinstance(task_grads, str):
        raise TypeError(
            "task_grads must be a tensor or a sequence of tensors shaped (K, *param.shape), "
            f"got {type(task_grads).__name__}"
        )
    if len(task_grads) == 0:
        raise ValueError("task_grads is empty: give one (K, *param.shape) tensor per parameter")
    matrices = []
    for index, grad in enumerate(task_grads):
        what = f"task_grads[{index}]"
        if not isinstance(grad, Tensor):
            raise TypeError(f"{what}: expected a tensor, got {type(grad).__name__}")
        if not grad.is_floating_point():
            raise TypeError(f"{what}: gradients must be floating-point, got {grad.dtype}")
        if grad.dim() == 0:
            raise ValueError(f"{what}: shape () has no task axis; expected (K, *param.shape)")
        first = matrices[0] if matrices else grad
        if grad.shape[0] != first.shape[0]:
            raise ValueError(
                f"{what} has {grad.shape[0]} task rows but task_grads[0] has {first.shape[0]}"
            )
        if grad.device != first.device:
            raise ValueError(f"{what} is on {grad.device} but task_grads[0] on {first.device}")
        if grad.shape[0] == 0:
            raise ValueError(f"{what}: at least one task is needed, got K = 0")
        matrix = grad.reshape(grad.shape[0], -1)
        matrices.append(matrix if matrix.stride(-1) == 1 else matrix.contiguous())
    return matrices


def _launch(matrices: Sequence[Tensor], diagonal: bool) -> Tensor:
    from fused_mtl.kernels import gram as kernels

    return kernels.task_gram_or_norms(list(matrices), diagonal)


def _reference(matrices: Sequence[Tensor], diagonal: bool) -> Tensor:
    if diagonal:
        return reference.task_grad_norms(matrices)
    return reference.task_gram(matrices)


def _matrix_grads(
    matrices: Sequence[Tensor], result: Tensor, grad_result: Tensor, diagonal: bool
) -> list[Tensor]:
    """Gradients for each input matrix (see the module docstring), in its dtype."""
    if diagonal:
        # Zero norm: g_i = 0 and the norm's subgradient 0 is taken, as torch.linalg.norm does.
        scale = torch.where(result > 0, grad_result / result, torch.zeros_like(result))
        return [(scale[:, None] * m.to(scale.dtype)).to(m.dtype) for m in matrices]
    symmetric = grad_result + grad_result.T
    # The Gram is float64; its gradient is taken in the gradients' compute dtype (float32 unless
    # they are float64), as the forward's products were before widening: a float64 product
    # would first copy every gradient to float64.
    dtypes = [reference.compute_dtype(m.dtype) for m in matrices]
    return [
        (symmetric.to(dtype) @ m.to(dtype)).to(m.dtype)
        for m, dtype in zip(matrices, dtypes, strict=True)
    ]


def _setup_context(ctx, inputs, output):
    """What both wrappers keep for the backward: the output, the matrices, the mode."""
    matrices, diagonal = inputs
    ctx.save_for_backward(output, *matrices)
    ctx.diagonal = diagonal


class _TaskGramFunction(torch.autograd.Function):
    """Eager-mode autograd node of the Triton path."""

    @staticmethod
    def forward(ctx, diagonal, *matrices):
        result = _launch(matrices, diagonal)
        _setup_context(ctx, (matrices, diagonal), result)
        return result

    @staticmethod
    def backward(ctx, grad_result):
        result, *matrices = ctx.saved_tensors
        return None, *_matrix_grads(matrices, result, grad_result, ctx.diagonal)


@torch.library.custom_op("fused_mtl::task_gram", mutates_args=())
def _task_gram_op(matrices: list[Tensor], diagonal: bool) -> Tensor:
    return _launch(matrices, diagonal)


@_task_gram_op.register_fake
def _task_gram_fake(matrices, diagonal):
    num_tasks = matrices[0].shape[0]
    shape = (num_tasks,) if diagonal else (num_tasks, num_tasks)
    dtype = torch.float32 if diagonal else torch.float64
    if diagonal and any(m.dtype == torch.float64 for m in matrices):
        dtype = torch.float64
    return matrices[0].new_empty(shape, dtype=dtype)


def _backward(ctx, grad_result):
    result, *matrices = ctx.saved_tensors
    return _matrix_grads(matrices, result, grad_result, ctx.diagonal), None


_task_gram_op.register_autograd(_backward, setup_context=_setup_context)


def task_gram_or_norms(task_grads: TaskGrads, diagonal: bool, backend: Backend) -> Tensor:
    """The Gram ``(K, K)`` or the norms ``(K,)``; ``backend`` is taken as requested.

    The Gram is float64 (its entries are products of gradients, which float32's range cannot
    hold for gradients below 1e-19 or above 1.8e19; see ``reference.task_gram``); the norms are
    float32 for fp32/fp16/bf16 gradients and float64 when any is float64.
    """
    matrices = task_matrices(task_grads)
    if resolve_backend(backend, *matrices) == "torch":
        # Autocast would run the reference's matmul in half precision: the Gram and the norms
        # are float32 (float64) whatever autocast does, as on the Triton path.
        with torch.autocast(matrices[0].device.type, enabled=False):
            return _reference(matrices, diagonal)
    if torch.compiler.is_compiling():
        return _task_gram_op(matrices, diagonal)
    return _TaskGramFunction.apply(diagonal, *matrices)
