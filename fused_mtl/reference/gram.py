"""Gram matrix and norms of the per-task gradients in plain torch.

Per-task gradients
------------------
With ``g_i`` task i's gradient of the shared parameters (all of them, flattened and joined), the
Gram matrix is ``M_ik = <g_i, g_k>`` and the norms are ``||g_i|| = sqrt(M_ii)``. Gradients come
as one tensor ``(K, *param.shape)`` per shared parameter, so ``M = sum_j G_j G_j^T``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

#: Elements of a half-precision gradient matrix upcast at a time (8 MiB of float32, 2^18
#: columns at K = 8). A whole-matrix upcast writes a fresh float32 copy on every call (32 MiB
#: for 8 x 1M bfloat16), and fresh memory is what costs: the Gram took 4.0x and the norms 13.8x
#: their float32 time on a CPU. Chunks copied into one reused buffer brought both to about
#: 1.5x (measured from 2^13 to 2^20 columns: 3.6x at 2^13, 1.5x at 2^18, 13x at 2^20).
UPCAST_CHUNK_ELEMENTS = 1 << 21


def _task_matrices(
    task_grads: Sequence[Tensor], dtype: torch.dtype | None = None
) -> Iterator[Tensor]:
    """Each ``(K, *param.shape)`` gradient as ``(K, P_j)`` column blocks in ``dtype`` (by default
    the compute dtype: float64 if any gradient is, else float32): matrices already in it
    whole, the others a chunk of columns at a time.

    A generator, whose consumer uses each block before asking for the next: half-precision
    chunks are copied into one buffer, rewritten for every chunk. Where autograd may need the
    blocks (an input requires grad) or torch.compile traces, each chunk is a new tensor.
    """
    if dtype is None:
        dtype = (
            torch.float64 if any(g.dtype == torch.float64 for g in task_grads) else torch.float32
        )
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
    """``M = sum_j G_j G_j^T``, shape ``(K, K)``, float64 whatever the gradients' dtype.

    Exactly symmetric, as the Triton path's: the lower triangle is the upper one mirrored (a
    matrix product ``G G^T`` rounds its two triangles apart, by 2.7e-5 at K = 8, P = 4097 with
    entries near 4e3).

    Float64 because the Gram of float32 gradients does not fit float32: its entries are
    products, so gradients below 1e-19 give products that underflow (a Gram of zeros at 1e-30)
    and gradients above 1.8e19 sums that overflow (inf at 1e30). In float64 the products of any
    two float32 values are exact and in range. On a CPU outside ``torch.compile`` the float32
    product is taken first and kept, widened, when it cannot have lost anything to the range
    (see ``_float32_gram_in_range``): a float64 product of 8 x 1M float32 gradients took 2.1x
    the float32 one (a widening copy, then a matrix product at half the rate). Elsewhere (a GPU,
    where reading the check would wait for the device, or a compiled graph) the gradients are
    widened a chunk at a time and multiplied in float64.
    """
    if torch.compiler.is_compiling() or any(
        g.device.type != "cpu" or g.dtype == torch.float64 for g in task_grads
    ):
        return _symmetric(_gram_in(task_grads, torch.float64))
    gram = _gram_in(task_grads, torch.float32)
    columns = sum(g[0].numel() for g in task_grads)
    if not _float32_gram_in_range(gram, columns):
        gram = _gram_in(task_grads, torch.float64)
    return _symmetric(gram.to(torch.float64))


def _gram_in(task_grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return sum(m @ m.T for m in _task_matrices(task_grads, dtype))


def _symmetric(gram: Tensor) -> Tensor:
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


def _float32_gram_in_range(gram: Tensor, columns: int) -> bool:
    """Whether a float32 Gram of ``columns`` columns is as accurate as if float32 had no range
    limits: no sum overflowed (all finite), and the products that underflowed (each off by at
    most 2^-149) add up, over every column, to less than float32's rounding (2^-24) of the
    smallest diagonal entry, which bounds every ``|M_ik| <= n_i n_k`` from below. A zero
    diagonal entry (a zero gradient, or one whose squares all underflowed) fails: the float64
    product tells them apart. A host read of a (K, K) tensor: CPU only."""
    smallest = gram.diagonal().min()
    return bool(torch.isfinite(gram).all() & (smallest * 2.0**-24 >= columns * 2.0**-149))


def unit_scale(gram: Tensor) -> Tensor:
    """The power of two at or below the largest diagonal entry (1 when that is 0 or not finite):
    dividing by it brings the Gram to a largest diagonal in [1, 2) without rounding, so that the
    solvers see numbers near 1 whatever the gradients' scale. A tensor op, no host
    synchronisation."""
    largest = gram.detach().diagonal().max().to(torch.float64)
    usable = largest.isfinite() & (largest > 0)
    _, exponent = torch.frexp(torch.where(usable, largest, 1.0))
    return torch.where(usable, torch.ldexp(torch.ones_like(largest), exponent - 1), 1.0)


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
