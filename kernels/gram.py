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
   per (chunk, row tile, column tile) writes the partial Gram (float64) or the partial squared
   norms (fp32) of its chunk to its own slot of a ``partials`` buffer. All tensors of the
   sequence go through this one launch: their pointers, row strides and widths are passed as
   tuples (a constexpr count specialises the kernel), so the gradients are never concatenated
   into a copy.
2. ``_reduce_partials_kernel``: each output element sums its partials over the chunks in chunk
   order (a fixed order, hence reproducible), takes the square root for the norms, and makes the
   Gram exactly symmetric by reading the upper triangle for both halves.

Values are loaded in their storage dtype and converted before any arithmetic (which keeps the
kernels inside what the Triton interpreter supports: no bf16 arithmetic). The norms are summed
in fp32: a product of two fp16 or bf16 values is exact in fp32. The Gram reads fp16 and bf16
gradients through float32 copies, a group of columns at a time (see _UPCAST_GROUP_ELEMENTS),
and is multiplied and summed in float64 and returned in float64: a product of two fp32 values
is exact in float64 (48 of its 53 mantissa bits) and lies in its range whatever the gradients'
scale, where in fp32 the products of gradients below 1e-19 underflow and those above 1.8e19
overflow (a Gram of zeros or of inf, and the weights of every Gram method with it). On sm_80
and sm_90 the float64 product runs on the tensor cores (``mma.sync ... f64``, 67 TFLOP/s on an
H100 SXM, as much as the fp32 FMA units that ``input_precision="ieee"`` used before); triton
3.7 lowers it to float64 FMAs on sm_100. ``input_precision="ieee"``: no TF32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from fused_mtl.kernels._launch import on_device_of

# Gram tiles are BLOCK_K x BLOCK_K. tl.dot needs every dimension >= 16, so K < 16 tasks are folded
# into a 16-row tile (see the kernel): 16 multiply-adds per element read for every K <= 16,
# where a 16-row tile with K = 2 real rows would spend 128. At the copy bandwidth of an H100
# (about 3 TB/s, 0.75 G fp32 elements per ms) that is 24 TFLOP/s of fp32 FMA instead of 190,
# over the ~67 TFLOP/s the chip has. Above 64 rows the accumulator (64 x 64 fp32 = 32 registers
# per thread at 4 warps) leaves too few registers for the loaded block, so larger K is tiled over
# the grid's second and third axes.
_MIN_GRAM_ROWS = 16
_MAX_GRAM_ROWS = 64
# Where the float64 dot is FMAs (sm_100), 64-row tiles spilled at 168 registers; 32 rows did not.
_MAX_FMA_GRAM_ROWS = 32
_FMA_GRAM_COLUMNS = 16
# Norms need no tl.dot: a tile of up to 32 rows, each row a plain sum of squares.
_MAX_NORM_ROWS = 32
# Each loaded block holds 4096 values (16 fp32 registers per thread at 8 warps): wide enough for
# 16-byte vector loads along P, small enough to leave registers for the accumulator (the norms'
# elementwise accumulator is as large again).
_BLOCK_ELEMENTS = 4096
# The Gram multiplies in float64 (see the module docstring), whose operands take twice the
# registers: tiles of more than 16 rows load fewer columns at a time, at 8 warps. Compiled
# (benchmarks/results/kernel-resources.md): 64 x 32 blocks took up to 186 registers on sm_90
# (12% occupancy) where the loads are 4 bytes wide, and 32 x 64 blocks spilled on sm_100
# (float64 FMAs there, no MMA); 64 x 16 and 32 x 32 blocks neither.
_WIDE_GRAM_COLUMNS = {32: 32, 64: 16}
# The Gram's tl.dot of float64 operands widened from 16-bit loads does not compile for sm_80,
# sm_90 or sm_100 with triton 3.7 or 3.8 (the MMA lowering asserts "fp64 don't support largeK
# MMA": the operands keep the 16-bit loads' layout, whatever casts come between),
# so fp16 / bf16 gradients are copied to float32 first, into one buffer of at most this many
# elements (256 MiB), each time it fills one pair of launches. The norms read them as they are.
_UPCAST_GROUP_ELEMENTS = 1 << 26
# The 16 x 16 Gram tile (every K <= 16) is computed by 2 warps: the float64 MMA instruction is
# 16 x 8, so a 16 x 16 output has two instruction tiles, and at 8 warps each was computed by 4
# warps at once (4 times the DMMA and float32 -> float64 conversions per element read, seen in
# the SASS; conversions run at 16 per clock per SM on sm_80 and sm_90). At 2 warps the loads
# stay 16-byte cp.async copies and the launcher's 4 programs per SM keep 4 x 2 blocks x 16 KiB
# of loads in flight per SM (benchmarks/results/kernel-resources.md).
# Where the float64 dot is FMAs (sm_100), each thread computes its own outputs: 2 warps held
# 16 x 16 / 64 outputs' operands per thread and spilled at 255 registers, 8 warps take 49.
_SMALL_GRAM_WARPS = 2
# Programs per SM for the first pass, each a cp.async pipeline of 2 blocks ahead: 128 KiB of
# loads in flight per SM for the 16-row Gram tile (an H100 needs about 3.35 TB/s x 1 us / 132
# SMs = 25 KiB per SM to cover a microsecond of memory latency).
_PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: a few chunks exercise the two-pass design
# without multiplying interpreted Python work.
_INTERPRETER_PROGRAMS = 4
_REDUCE_BLOCK = 256


@triton.jit
def _add_block(
    acc, base, row_offsets, col_offsets, row_mask, col_mask, offsets, end,
    MASK_COLUMNS: tl.constexpr, DIAGONAL: tl.constexpr, SINGLE_TILE: tl.constexpr,
):  # fmt: skip
    """``acc`` plus one loaded block's squares (DIAGONAL) or tile product."""
    if MASK_COLUMNS:
        row_mask = row_mask[:, None] & (offsets < end)
        col_mask = col_mask[:, None] & (offsets < end)
    else:
        row_mask = row_mask[:, None]
        col_mask = col_mask[:, None]
    block = tl.load(base + row_offsets + offsets, mask=row_mask, other=0.0).to(tl.float32)
    if DIAGONAL:
        acc += block * block
    else:
        wide = block.to(tl.float64)
        if SINGLE_TILE:
            other_wide = wide
        else:
            other_wide = tl.load(base + col_offsets + offsets, mask=col_mask, other=0.0)
            other_wide = other_wide.to(tl.float32).to(tl.float64)
        acc += tl.dot(wide, tl.trans(other_wide), input_precision="ieee")
    return acc


@triton.jit
def _task_gram_partials_kernel(
    grads,  # tuple of NUM_TENSORS pointers, each to a (K, P_j) matrix with unit column stride
    row_strides,  # tuple: elements between consecutive task rows of each matrix
    widths,  # tuple: P_j, the columns of each matrix
    first_chunks,  # tuple: index of the first chunk (program along axis 0) of each matrix
    partials_ptr,  # (num_chunks, K, K) float64 or (num_chunks, K) fp32 output, contiguous
    num_tasks,  # K
    chunk_width,  # columns per chunk (a multiple of BLOCK_P * FOLD)
    NUM_TENSORS: tl.constexpr,
    DIAGONAL: tl.constexpr,  # True: squared norms only; False: the full Gram tile
    SINGLE_TILE: tl.constexpr,  # K <= BLOCK_K // FOLD: the row and column tiles are the same rows
    BLOCK_K: tl.constexpr,  # rows of a loaded tile
    BLOCK_P: tl.constexpr,  # columns of a loaded tile
    FOLD: tl.constexpr,  # tile rows per task (see below); 1 unless a small-K Gram
):
    """One program: the partial Gram tile (or squared norms) of one chunk of one matrix.

    ``tl.dot`` needs at least 16 rows. A Gram of K < 16 tasks would waste most of a 16-row tile
    on masked rows (at K = 2, 128 multiply-adds per element read instead of 16), so the tile is
    folded: each task takes FOLD = 16 / K' consecutive rows (K' = K rounded up to a power of
    two), each row a different run of BLOCK_P columns. The 16 x 16 product then holds, for each
    pair of tasks, FOLD x FOLD blocks of partial dot products, of which the FOLD matching ones
    (the same columns) are summed once at the end.
    """
    chunk = tl.program_id(0)
    tasks_per_tile: tl.constexpr = BLOCK_K // FOLD
    tile_rows = tl.arange(0, BLOCK_K)
    rows = tl.program_id(1) * tasks_per_tile + tile_rows // FOLD  # the task of each tile row
    cols = tl.program_id(2) * tasks_per_tile + tile_rows // FOLD
    # Column of each tile element from the block's start: its row's run (a run of BLOCK_P
    # columns per tile row), then BLOCK_P consecutive columns.
    run_offsets = ((tile_rows % FOLD) * BLOCK_P)[:, None] + tl.arange(0, BLOCK_P)[None, :]
    row_mask = rows < num_tasks
    col_mask = cols < num_tasks
    if DIAGONAL:
        # Squares are summed elementwise in the loop and across columns once after it: a sum over
        # axis 1 inside the loop would put a cross-warp reduction (shared memory and a barrier)
        # between consecutive loads.
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float64)
    # Chunks are numbered matrix after matrix; the static loop finds the one this chunk is in.
    for t in tl.static_range(NUM_TENSORS):
        local = chunk - first_chunks[t]
        start = local * chunk_width
        if (local >= 0) & (start < widths[t]):
            end = tl.minimum(start + chunk_width, widths[t])
            # int64 row offsets: K rows of a 64 M-column matrix pass 2^31 elements.
            row_offsets = rows.to(tl.int64)[:, None] * row_strides[t]
            col_offsets = cols.to(tl.int64)[:, None] * row_strides[t]
            # Whole steps first, without a column mask (the row mask is constant along a row):
            # fewer instructions per element, and 16-byte loads wherever Triton knows the row
            # stride to be a multiple of 16 elements, whatever the width. Then the last,
            # partial step, masked.
            step: tl.constexpr = BLOCK_P * FOLD
            whole_end = start + (end - start) // step * step
            for block_start in range(start, whole_end, step):
                acc = _add_block(
                    acc, grads[t], row_offsets, col_offsets, row_mask, col_mask,
                    block_start + run_offsets, end, False, DIAGONAL, SINGLE_TILE,
                )  # fmt: skip
            if whole_end < end:
                acc = _add_block(
                    acc, grads[t], row_offsets, col_offsets, row_mask, col_mask,
                    whole_end + run_offsets, end, True, DIAGONAL, SINGLE_TILE,
                )  # fmt: skip
    if DIAGONAL:
        tl.store(partials_ptr + chunk * num_tasks + rows, tl.sum(acc, axis=1), mask=row_mask)
    else:
        tasks = tl.arange(0, tasks_per_tile)
        out_rows = tl.program_id(1) * tasks_per_tile + tasks
        out_cols = tl.program_id(2) * tasks_per_tile + tasks
        if FOLD > 1:
            # Keep the products of tile rows that read the same columns, then sum each task
            # pair's FOLD x FOLD block: (K' FOLD, K' FOLD) -> (K', FOLD, K', FOLD) -> (K', K').
            same_run = (tile_rows % FOLD)[:, None] == (tile_rows % FOLD)[None, :]
            kept = tl.reshape(
                tl.where(same_run, acc, 0.0), (tasks_per_tile, FOLD, tasks_per_tile, FOLD)
            )
            tile = tl.sum(tl.sum(kept, axis=3), axis=1)
        else:
            tile = acc
        tile_offsets = out_rows[:, None] * num_tasks + out_cols[None, :]
        tl.store(
            partials_ptr + chunk * num_tasks * num_tasks + tile_offsets,
            tile,
            mask=(out_rows < num_tasks)[:, None] & (out_cols < num_tasks)[None, :],
        )


@triton.jit
def _reduce_partials_kernel(
    partials_ptr,  # (num_chunks, K, K) float64 or (num_chunks, K) fp32, from the first pass
    out_ptr,  # (K, K) float64 Gram or (K,) fp32 norms, contiguous
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
    acc = tl.zeros((BLOCK,), dtype=partials_ptr.dtype.element_ty)
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


class Tiling(NamedTuple):
    """How the first pass cuts the work: tile rows, tile columns, tile rows per task, warps,
    and the registers a thread may take."""

    block_k: int
    block_p: int
    fold: int
    num_warps: int

    # The register ceiling given to ptxas. Left to itself, ptxas held some variants to 48-96
    # registers and spilled 8 to 24 bytes (56 spill instructions for 8 parameters on sm_100).
    max_registers: int


def tiling(num_tasks: int, diagonal: bool, fp64_mma: bool = True) -> Tiling:
    """The first pass's tiling for K tasks (see the constants above for the reasons).
    ``fp64_mma``: the GPU multiplies float64 on its tensor cores (see _has_fp64_mma)."""
    rows = triton.next_power_of_2(num_tasks)
    max_rows = _MAX_GRAM_ROWS if fp64_mma else _MAX_FMA_GRAM_ROWS
    if diagonal:
        block_k, fold = min(rows, _MAX_NORM_ROWS), 1
    elif rows < _MIN_GRAM_ROWS:
        block_k, fold = _MIN_GRAM_ROWS, _MIN_GRAM_ROWS // rows
    else:
        block_k, fold = min(rows, max_rows), 1
    if not diagonal and block_k > _MIN_GRAM_ROWS:
        # 168 registers: one program of 8 warps per SM; at 128 a 32 x 64 tile spilled on sm_100,
        # where a 32 x 32 one over a grid of tiles still did at 168, and 32 x 16 does not.
        columns = _WIDE_GRAM_COLUMNS[block_k] if fp64_mma else _FMA_GRAM_COLUMNS
        return Tiling(block_k, columns, fold, 8, 168)
    block_p = max(16, _BLOCK_ELEMENTS // block_k)
    if not diagonal and fp64_mma:
        return Tiling(block_k, block_p, fold, _SMALL_GRAM_WARPS, 168)
    num_warps = 8 if block_k * block_p >= _BLOCK_ELEMENTS else 4
    # Two programs of 8 warps per SM (the norms are memory-bound: more would wait in line).
    return Tiling(block_k, block_p, fold, num_warps, 128)


@functools.cache
def _has_fp64_mma(device: torch.device) -> bool:
    """Whether triton lowers the Gram's float64 tl.dot to MMA: on sm_8x and sm_9x (DMMA), not on
    sm_100, where it becomes float64 FMAs (benchmarks/results/kernel-resources.md). The
    interpreter takes the MMA tiling."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] in (8, 9)


def task_gram_or_norms(matrices: list[torch.Tensor], diagonal: bool) -> torch.Tensor:
    """The float64 Gram or the fp32 norms of the ``(K, P_j)`` matrices.

    Every matrix must have unit column stride (``stride(1) == 1``); the op layer ensures it.
    """
    if diagonal or all(matrix.dtype == torch.float32 for matrix in matrices):
        return _launch_passes(matrices, diagonal)
    return _gram_through_float32(matrices)


def _gram_through_float32(matrices: list[torch.Tensor]) -> torch.Tensor:
    """The Gram of matrices some of which are fp16 / bf16: their columns are copied, in order,
    into one float32 buffer of at most _UPCAST_GROUP_ELEMENTS, and each full buffer is one
    pair of launches over one (K, width) matrix, the partial Grams summed in float64. The
    buffer's rows are a multiple of 16 elements long, so its loads are 16-byte vectors."""
    num_tasks, device = matrices[0].shape[0], matrices[0].device
    total_width = sum(matrix.shape[1] for matrix in matrices)
    width = min(total_width, max(16, _UPCAST_GROUP_ELEMENTS // num_tasks // 16 * 16))
    buffer = torch.empty(
        (num_tasks, triton.cdiv(width, 16) * 16), dtype=torch.float32, device=device
    )
    gram = None
    filled = 0

    def flush() -> None:
        nonlocal gram, filled
        part = _launch_passes([buffer[:, :filled]], diagonal=False)
        gram = part if gram is None else gram + part
        filled = 0

    for matrix in matrices:
        copied = 0
        while copied < matrix.shape[1]:
            if filled == width:
                flush()
            take = min(width - filled, matrix.shape[1] - copied)
            buffer[:, filled : filled + take].copy_(matrix[:, copied : copied + take])
            filled, copied = filled + take, copied + take
    if filled or gram is None:  # the last group; an empty one only if there are no columns
        flush()
    return gram


def _launch_passes(matrices: list[torch.Tensor], diagonal: bool) -> torch.Tensor:
    """Launch both passes over the matrices (float32 ones for the Gram)."""
    num_tasks = matrices[0].shape[0]
    device = matrices[0].device
    block_k, block_p, fold, num_warps, max_registers = tiling(
        num_tasks, diagonal, _has_fp64_mma(device)
    )
    row_tiles = triton.cdiv(num_tasks, block_k // fold)
    col_tiles = 1 if diagonal else row_tiles
    total_width = sum(matrix.shape[1] for matrix in matrices)
    # Chunk width from the shapes: about _target_programs programs in all, whole steps of the
    # column loop (a folded tile covers block_p * fold columns of each task) each.
    step = block_p * fold
    chunks_wanted = max(1, _target_programs(device) // (row_tiles * col_tiles))
    chunk_width = step * max(1, triton.cdiv(total_width, chunks_wanted * step))
    first_chunks, num_chunks = [], 0
    for matrix in matrices:
        first_chunks.append(num_chunks)
        num_chunks += max(1, triton.cdiv(matrix.shape[1], chunk_width))
    per_chunk = (num_tasks,) if diagonal else (num_tasks, num_tasks)
    dtype = torch.float32 if diagonal else torch.float64
    partials = torch.empty((num_chunks, *per_chunk), dtype=dtype, device=device)
    out = torch.empty(per_chunk, dtype=dtype, device=device)
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
            FOLD=fold,
            num_warps=num_warps,
            maxnreg=max_registers,
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
