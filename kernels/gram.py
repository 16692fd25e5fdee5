"""Batched per-task gradient norms and the K x K Gram matrix of per-task gradients.

The input is a sequence of gradient matrices ``G_j`` of shape ``(K, P_j)``, one per shared
parameter (row ``i`` of ``G_j`` is task ``i``'s gradient of parameter ``j``, flattened). Seen as
one ``(K, P)`` matrix ``G = [G_1 | G_2 | ...]`` with ``P = sum_j P_j``, the outputs are

- the Gram matrix ``M = G G^T = sum_j G_j G_j^T`` (``M_ik = <g_i, g_k>``), and
- the norms ``||g_i|| = sqrt(M_ii)``, computed without the off-diagonal products.

Both read every gradient element exactly once, so they are bound by memory bandwidth for the
task counts of multi-task learning (K <= 64: 2K flops per 4-byte element, under the ~20
flop/byte at which an H100 stops being memory-bound).

Two passes, no atomics, bitwise reproducible:

1. ``_task_gram_partials_kernel``: the columns of every ``G_j`` are cut into chunks; one program
   per (chunk, row tile, column tile) writes the fp32 partial Gram (or partial squared norms) of
   its chunk to its own slot of a ``partials`` buffer. All tensors of the sequence go through
   this one launch: their pointers, row strides and widths are passed as tuples (a constexpr
   count specialises the kernel), so the gradients are never concatenated into a copy.
2. ``_reduce_partials_kernel``: each output element sums its partials over the chunks in chunk
   order (a fixed order, hence reproducible), takes the square root for the norms, and makes the
   Gram exactly symmetric by reading the upper triangle for both halves.

Values are loaded in their storage dtype and converted to fp32 before any arithmetic: a product
of two fp16 or bf16 values is exact in fp32, so the only rounding is the fp32 accumulation. This
also keeps the kernels inside what the Triton interpreter supports (no bf16 arithmetic). The
matrix product uses ``input_precision="ieee"``: TF32 would round fp32 inputs to 10 mantissa bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from fused_mtl.kernels._launch import on_device_of

# Gram tiles are BLOCK_K x BLOCK_K. tl.dot needs every dimension >= 16; above 64 rows the
# accumulator (64 x 64 fp32 = 32 registers per thread at 4 warps) leaves too few registers for the
# loaded block, so larger K is tiled over the grid's second and third axes.
_MIN_GRAM_ROWS = 16
_MAX_GRAM_ROWS = 64
# Norms need no tl.dot: a tile of up to 32 rows, each row a plain sum of squares.
_MAX_NORM_ROWS = 32
# Each loaded block holds 4096 values (16 fp32 registers per thread at 8 warps): wide enough for
# 16-byte vector loads along P, small enough to leave registers for the accumulator.
_BLOCK_ELEMENTS = 4096
# Programs per SM for the first pass: enough resident warps to cover memory latency.
_PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: a few chunks exercise the two-pass design
# without multiplying interpreted Python work.
_INTERPRETER_PROGRAMS = 4
_REDUCE_BLOCK = 256


@triton.jit
def _task_gram_partials_kernel(
    grads,  # tuple of NUM_TENSORS pointers, each to a (K, P_j) matrix with unit column stride
    row_strides,  # tuple: elements between consecutive task rows of each matrix
    widths,  # tuple: P_j, the columns of each matrix
    first_chunks,  # tuple: index of the first chunk (program along axis 0) of each matrix
    partials_ptr,  # (num_chunks, K, K) or (num_chunks, K) fp32 output, contiguous
    num_tasks,  # K
    chunk_width,  # columns per chunk (a multiple of BLOCK_P)
    NUM_TENSORS: tl.constexpr,
    DIAGONAL: tl.constexpr,  # True: squared norms only; False: the full Gram tile
    SINGLE_TILE: tl.constexpr,  # K <= BLOCK_K: the row and column tiles are the same rows
    BLOCK_K: tl.constexpr,  # task rows per tile
    BLOCK_P: tl.constexpr,  # columns per loaded block
):
    """One program: the partial Gram tile (or squared norms) of one chunk of one matrix."""
    chunk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < num_tasks
    col_mask = cols < num_tasks
    if DIAGONAL:
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    # Chunks are numbered matrix after matrix; the static loop finds the one this chunk is in.
    for t in tl.static_range(NUM_TENSORS):
        local = chunk - first_chunks[t]
        start = local * chunk_width
        if (local >= 0) & (start < widths[t]):
            end = tl.minimum(start + chunk_width, widths[t])
            # int64 row offsets: K rows of a 64 M-column matrix pass 2^31 elements.
            row_offsets = rows.to(tl.int64)[:, None] * row_strides[t]
            col_offsets = cols.to(tl.int64)[:, None] * row_strides[t]
            for block_start in range(start, end, BLOCK_P):
                offsets = block_start + tl.arange(0, BLOCK_P)
                in_chunk = offsets[None, :] < end
                block = tl.load(
                    grads[t] + row_offsets + offsets[None, :],
                    mask=row_mask[:, None] & in_chunk,
                    other=0.0,
                ).to(tl.float32)
                if DIAGONAL:
                    acc += tl.sum(block * block, axis=1)
                else:
                    if SINGLE_TILE:
                        other_block = block
                    else:
                        other_block = tl.load(
                            grads[t] + col_offsets + offsets[None, :],
                            mask=col_mask[:, None] & in_chunk,
                            other=0.0,
                        ).to(tl.float32)
                    acc += tl.dot(block, tl.trans(other_block), input_precision="ieee")
    if DIAGONAL:
        tl.store(partials_ptr + chunk * num_tasks + rows, acc, mask=row_mask)
    else:
        tile_offsets = rows[:, None] * num_tasks + cols[None, :]
        tl.store(
            partials_ptr + chunk * num_tasks * num_tasks + tile_offsets,
            acc,
            mask=row_mask[:, None] & col_mask[None, :],
        )


@triton.jit
def _reduce_partials_kernel(
    partials_ptr,  # (num_chunks, K, K) or (num_chunks, K) fp32, from the first pass
    out_ptr,  # (K, K) Gram or (K,) norms, contiguous
    num_chunks,
    num_tasks,  # K
    DIAGONAL: tl.constexpr,  # True: out = sqrt(sum of squared-norm partials)
    BLOCK: tl.constexpr,  # output elements per program
):
    """Each output element: its partials summed in chunk order (deterministic)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if DIAGONAL:
        num_outputs = num_tasks
        source = offsets
    else:
        num_outputs = num_tasks * num_tasks
        # M_ik and M_ki both read the upper-triangle partial: the Gram is exactly symmetric.
        row = offsets // num_tasks
        col = offsets % num_tasks
        source = tl.minimum(row, col) * num_tasks + tl.maximum(row, col)
    mask = offsets < num_outputs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for chunk in range(0, num_chunks):
        acc += tl.load(partials_ptr + chunk * num_outputs + source, mask=mask, other=0.0)
    if DIAGONAL:
        acc = tl.sqrt(acc)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_PER_SM * sm_count


def _tile_rows(num_tasks: int, diagonal: bool) -> int:
    rows = triton.next_power_of_2(num_tasks)
    if diagonal:
        return min(rows, _MAX_NORM_ROWS)
    return max(_MIN_GRAM_ROWS, min(rows, _MAX_GRAM_ROWS))


def task_gram_or_norms(matrices: list[torch.Tensor], diagonal: bool) -> torch.Tensor:
    """Launch both passes over the ``(K, P_j)`` matrices; return the fp32 Gram or norms.

    Every matrix must have unit column stride (``stride(1) == 1``); the op layer ensures it.
    """
    num_tasks = matrices[0].shape[0]
    device = matrices[0].device
    block_k = _tile_rows(num_tasks, diagonal)
    block_p = max(16, _BLOCK_ELEMENTS // block_k)
    row_tiles = triton.cdiv(num_tasks, block_k)
    col_tiles = 1 if diagonal else row_tiles
    total_width = sum(matrix.shape[1] for matrix in matrices)
    # Chunk width from the shapes: about _target_programs programs in all, whole blocks each.
    chunks_wanted = max(1, _target_programs(device) // (row_tiles * col_tiles))
    chunk_width = block_p * max(1, triton.cdiv(total_width, chunks_wanted * block_p))
    first_chunks, num_chunks = [], 0
    for matrix in matrices:
        first_chunks.append(num_chunks)
        num_chunks += max(1, triton.cdiv(matrix.shape[1], chunk_width))
    per_chunk = (num_tasks,) if diagonal else (num_tasks, num_tasks)
    partials = torch.empty((num_chunks, *per_chunk), dtype=torch.float32, device=device)
    out = torch.empty(per_chunk, dtype=torch.float32, device=device)
    with on_device_of(matrices[0]):
        _task_gram_partials_kernel[(num_chunks, row_tiles, col_tiles)](
            tuple(matrices),
            tuple(matrix.stride(0) for matrix in matrices),
            tuple(matrix.shape[1] for matrix in matrices),
            tuple(first_chunks),
            partials,
            num_tasks,
            chunk_width,
            NUM_TENSORS=len(matrices),
            DIAGONAL=diagonal,
            SINGLE_TILE=row_tiles == 1,
            BLOCK_K=block_k,
            BLOCK_P=block_p,
            num_warps=8 if block_k * block_p >= _BLOCK_ELEMENTS else 4,
        )
        _reduce_partials_kernel[(triton.cdiv(out.numel(), _REDUCE_BLOCK),)](
            partials,
            out,
            num_chunks,
            num_tasks,
            DIAGONAL=diagonal,
            BLOCK=_REDUCE_BLOCK,
        )
    return out
