"""Triton kernels for y = x W^T with uniform (affine) low-bit weights, any width 1..8.

Sources: MARLIN (arXiv 2408.11743) for the memory-bound design at small batch (dequantize inside
the K loop, fp32 accumulation, split the reduction so enough SMs stream weights); Tilus (arXiv
2504.12984) for arbitrary widths as compositions of power-of-two loads; gemlite
(mobiusml/gemlite ``gemv_revsplitK_kernels.py``, ``gemm_splitK_kernels.py``, ``utils.py``) for
the Triton structure: K-packed weights stored N-contiguous, ``w = u * s + zs`` and split-K.

One family, three schedules (the weight kind is a constexpr ``DEQUANT`` function, so the LUT
kernels in ``lut.py`` are these same schedules with a codebook lookup plugged in):

* ``decode`` (M <= 16): ONE launch per linear. All M rows in one program (the weight is read
  once), CUDA cores for BLOCK_M < 16 (``sum(x[:, :, None] * w[None], 1)``), ``tl.dot`` at
  BLOCK_M = 16. The reduction may be split over SPLIT_K programs; the split is reduced *serially*
  instead of with atomics into a zeroed workspace: every program stores its fp32 partial in
  ``part[split, m, n]`` (``torch.empty``: nothing to zero), then increments a per-column arrival
  counter; the program that arrives last for a column sums the SPLIT_K partials, adds the bias,
  writes x's dtype and resets the counter to 0 for the next launch (CUTLASS's "serial split-K"
  semaphore, per column). No zero-fill kernel, no cast kernel. SPLIT_K is a runtime argument (one
  compiled kernel serves every split; only "split or not" is compile-time). The counters are one
  int32 per output column, zeroed once per (device, stream) and left at zero by every launch.
* ``gemm`` (M > 16, or any M with sparse outliers): ``tl.dot`` on the dequantized tile,
  grouped-M tile order, optional split-K with atomic adds into an fp32 workspace.
* ``dequant``: one pass writes W in x's dtype in the packed layout's own order ``[K, N]`` (reads
  and writes are both N-contiguous, no transpose through shared memory), then one cuBLAS call
  ``addmm(bias, x, W_kn)``. Chosen for large M, or wherever the shipped table says it is faster.

Codes are loaded compactly: each plane's ``BLOCK_K / (32 / width)`` packed words per column are
loaded once and expanded in registers (``words[:, None, :] >> shifts[None, :, None]``, reshaped to
``[BLOCK_K, BLOCK_N]``), instead of gemlite's ``offs_k // per_word`` tile that issues one load per
code and relies on L1 to merge the repeats (8x the load instructions at 4 bits, 32x for the
1-bit plane of 3/5/7-bit codes). Hence BLOCK_K is a multiple of ``min_block_k(bits)``.

Codes become floats without the quarter-rate int->float conversion. Uniform decode on CUDA cores
(``_uniform_rows``, the M = 1 path): ``ONE | u << (23 - b)`` read as fp32 is ``1 + u / 2**b``, so a
code costs a shift and a mask-or, and sum_k x u = 2**b (sum_k x v - sum_k x) exactly; the group's
scale and zero are applied once per column. Elsewhere ``u | 0x4B000000`` read as fp32 is
``2**23 + u`` (Marlin's exponent trick in fp32), and one subtract also removes the symmetric zero.
``benchmarks/kernel_sass.py`` counts what this leaves per weight in the sm_90 SASS.

Activations are converted right after ``tl.load``: to fp32 on the CUDA-core paths, and to the
``tl.dot`` operand type on the tensor-core path (bf16 becomes fp32 under ``TRITON_INTERPRET=1``,
whose bf16 arithmetic is silently wrong; fp32 uses ``input_precision="ieee"``).

Scales are loaded as one [1, BLOCK_N] row per K-tile when a tile never crosses a group boundary
(``group % BLOCK_K == 0`` or per-channel), else as a [BLOCK_K, BLOCK_N] tile indexed by
``k // group``, so any group size, including groups that do not divide K, is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compressor.kernels.packing import PackedOutliers, PackedUniform
from compressor.kernels.sparse import outlier_add

DECODE_MAX_M = 16  # M <= this: the one-launch decode kernel (without outliers)
DEQUANT_MIN_M = 64  # heuristic: from here dequantize + cuBLAS (the H200 run: fused tiles 0.1-0.5x fp16 there); the table decides
MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2**23: (u | MAGIC) read as fp32 is 2**23 + u for u < 2**23
TWO_23 = tl.constexpr(8388608.0)
ONE = tl.constexpr(0x3F800000)  # fp32 bits of 1.0: (ONE | m << (23 - b)) read as fp32 is 1 + m / 2**b


# --------------------------------------------------------------------------------------------
# device helpers (shared with lut.py)


@triton.jit
def _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N,
                BITS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The WIDTH-bit plane of the codes of K-tile [k0, k0 + BLOCK_K), shifted to its place in the
    code: the tile's packed words are loaded once ([BLOCK_K / PER_WORD, BLOCK_N]) and expanded."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    first_row = rows_per_bit * (BITS - (BITS & (2 * WIDTH - 1)))  # the wider planes come first
    rows = k0 // PER_WORD + tl.arange(0, ROWS)
    mask = (rows < rows_per_bit * WIDTH)[:, None] & mask_n[None, :]
    words = tl.load(w_ptr + (first_row + rows)[:, None] * N + offs_n[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")
    shifts = tl.arange(0, PER_WORD) * WIDTH
    part = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(part << (BITS & (WIDTH - 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unsigned codes [BLOCK_K, BLOCK_N] (int32) of K-tile k0 from the planes layout of ``packing.py``."""
    u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    if BITS & 8:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 8, BLOCK_K, BLOCK_N)
    if BITS & 4:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 4, BLOCK_K, BLOCK_N)
    if BITS & 2:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 2, BLOCK_K, BLOCK_N)
    if BITS & 1:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 1, BLOCK_K, BLOCK_N)
    return u


@triton.jit
def no_table(meta_ptr, offs_n, mask_n, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Uniform weights keep nothing in registers across the K loop (see ``lut.lut_table``)."""
    return 0


@triton.jit
def dequant_affine(u, offs_k, offs_n, mask_k, mask_n, k0, scale_ptr, zs_ptr, table, N,
                   BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, SCALE_ROW: tl.constexpr):
    """fp32 weights from codes: (u - 2**(BITS-1)) * s (symmetric) or u * s + zs (zs = -z * s)."""
    if SCALE_ROW:  # the whole K-tile lies in one group: one [1, BLOCK_N] row of metadata
        if GROUP > 0:
            meta = (k0 // GROUP) * N + offs_n[None, :]
        else:
            meta = offs_n[None, :]
        meta_mask = mask_n[None, :]
    else:
        meta = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        meta_mask = mask_k[:, None] & mask_n[None, :]
    s = tl.load(scale_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
    if ASYM:
        return affine_values(u, BITS, ASYM) * s + tl.load(zs_ptr + meta, mask=meta_mask, other=0.0)
    return affine_values(u, BITS, ASYM) * s


@triton.jit
def affine_values(u, BITS: tl.constexpr, ASYM: tl.constexpr):
    """fp32 code values before the group scale: u - 2**(BITS-1) (symmetric) or u (asymmetric)."""
    magic = (u | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + u, exactly
    if ASYM:
        return magic - TWO_23
    return magic - (TWO_23 + (1 << (BITS - 1)))


@triton.jit
def scale_row(scale_ptr, zs_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """fp32 scale (and zero shift) [BLOCK_N] of the group holding K-tile k0 (SCALE_ROW tiles only)."""
    if GROUP > 0:
        meta = (k0 // GROUP) * N + offs_n
    else:
        meta = offs_n
    s = tl.load(scale_ptr + meta, mask=mask_n, other=0.0).to(tl.float32)
    zs = s
    if ASYM:
        zs = tl.load(zs_ptr + meta, mask=mask_n, other=0.0)
    return s, zs


@triton.jit
def load_mantissas(w_ptr, k0, offs_n, mask_n, rows_per_bit, N,
                   BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 numbers 1 + u * 2**-BITS [BLOCK_K, BLOCK_N] for the codes u of K-tile k0: each plane's
    bits are shifted straight to the top of the mantissa under the exponent of 1.0 (0x3F800000), so a
    code costs a shift and a mask-or per plane, and no conversion or subtraction at all."""
    bits = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N) << (23 - BITS)
    return (bits | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _uniform_rows(x_ptr, w_ptr, scale_ptr, zs_ptr, offs_m, mask_m, offs_n, mask_n, pid_k, SPLIT_K, K, N,
                  rows_per_bit, stride_xm, stride_xk, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """The decode reduction on CUDA cores for uniform weights whose K-tiles lie inside one group.

    Per weight: a shift and a mask-or give v = 1 + u / 2**BITS (``load_mantissas``: no int->float
    conversion, no zero subtracted), and one FMA adds x * v into a [BLOCK_M, BLOCK_K, BLOCK_N]
    accumulator. UNROLL tiles of one group are unrolled (their loads can all be in flight at once)
    and the accumulator is reduced over K once per UNROLL tiles: sum_k x u = 2**BITS (sum_k x v -
    sum_k x), an exact power-of-two scaling, then the group's scale (and zero) once per column. A
    program takes a contiguous run of such units, which never straddle a group.
    UNROLL (the config's ``unroll``) trades registers for instructions: sm_90 SASS of the K loop at
    4 bits, 512 x 16 tile, 4 warps: UNROLL 1 ~5.7 instructions per weight in ~95 registers, UNROLL 4
    ~4.9 (one FMA, one mask-or, ~1.4 shifts, ~0.3 x conversions) in ~250 registers; the first
    version's gemv took 8.5-11."""
    if GROUP > 0 and GROUP // BLOCK_K < UNROLL:
        TILES: tl.constexpr = GROUP // BLOCK_K
    else:
        TILES: tl.constexpr = UNROLL
    units = tl.cdiv(tl.cdiv(K, BLOCK_K), TILES)
    per = tl.cdiv(units, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for unit in range(pid_k * per, tl.minimum(units, pid_k * per + per)):
        g0 = unit * (TILES * BLOCK_K)
        if TILES == 1:  # reduce the tile's products directly (lets the compiler fuse them into FMAs)
            offs_k = g0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0, eviction_policy="evict_last").to(tl.float32)
            v = load_mantissas(w_ptr, g0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
            summed = tl.sum(x[:, :, None] * v[None, :, :], axis=1)
            x_sum = tl.sum(x, axis=1)[:, None]
        else:
            products = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
            x_sums = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for tile in tl.static_range(TILES):
                k0 = g0 + tile * BLOCK_K
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0, eviction_policy="evict_last").to(tl.float32)
                v = load_mantissas(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
                products += x[:, :, None] * v[None, :, :]
                x_sums += x
            summed = tl.sum(products, axis=1)
            x_sum = tl.sum(x_sums, axis=1)[:, None]
        xu = (summed - x_sum) * (1 << BITS)  # sum_k x u
        s, zs = scale_row(scale_ptr, zs_ptr, g0, offs_n, mask_n, N, GROUP, ASYM)
        if ASYM:  # zs = -z * s
            acc += xu * s[None, :] + x_sum * zs[None, :]
        else:
            acc += (xu - (1 << (BITS - 1)) * x_sum) * s[None, :]
    return acc


@triton.jit
def _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:  # fp32 workspace; the wrapper adds the bias after the last partial sum
        tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:
        _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS)


# --------------------------------------------------------------------------------------------
# the three schedules

STORE, SERIAL, ATOMIC = 0, 1, 2  # decode epilogues (the kernel spells them as literals)


@triton.jit
def _decode_kernel(x_ptr, w_ptr, meta_ptr, zs_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                   M, N, K, rows_per_bit, stride_xm, stride_xk, SPLIT_K,
                   DEQUANT: tl.constexpr, TABLE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                   ASYM: tl.constexpr, SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, FACTOR: tl.constexpr, UNROLL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M <= BLOCK_M rows against one N-tile and every SPLIT_K-th K-tile (see the module doc)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if FACTOR and BLOCK_M < 16:  # uniform on CUDA cores: ~3 instructions per weight (``_uniform_rows``)
        acc = _uniform_rows(x_ptr, w_ptr, meta_ptr, zs_ptr, offs_m, mask_m, offs_n, mask_n, pid_k, SPLIT_K, K, N,
                            rows_per_bit, stride_xm, stride_xk, BITS, GROUP, ASYM, BLOCK_M, BLOCK_N, BLOCK_K, UNROLL)
    else:
        table = TABLE(meta_ptr, offs_n, mask_n, BITS, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_last")
            u = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
            if FACTOR:  # uniform on tensor cores, tile inside one group: y += s * (x @ (u - z)), the scale once per tile
                v = affine_values(u, BITS, ASYM)
                s, zs = scale_row(meta_ptr, zs_ptr, k0, offs_n, mask_n, N, GROUP, ASYM)
                acc += tl.dot(x.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * s[None, :]
                if ASYM:  # zs = -z * s: + zs * sum_k x
                    acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * zs[None, :]
            else:
                w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW)
                if BLOCK_M >= 16:  # tensor cores
                    acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
                else:  # CUDA cores: the weight tile is used BLOCK_M times from registers
                    acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:  # STORE
        _store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS)
    elif EPILOGUE == 2:  # ATOMIC: fp32 workspace shared with the outlier kernel
        tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:  # SERIAL: store the partial; the last program to arrive at a column reduces it
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask, cache_modifier=".cg")
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(count_ptr + offs_n, 1, mask=mask_n, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        last = mask_n & (arrived == SPLIT_K - 1)
        mask_last = mask_m[:, None] & last[None, :]
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for split in range(SPLIT_K):
            total += tl.load(part_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask_last, other=0.0,
                             cache_modifier=".cg")
        _store_output(out_ptr, bias_ptr, total, offs_m, offs_n, mask_last, N, HAS_BIAS)
        tl.store(count_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=last)  # ready for the next launch


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, meta_ptr, zs_ptr, bias_ptr, out_ptr,
                 M, N, K, rows_per_bit, stride_xm, stride_xk, SPLIT_K,
                 DEQUANT: tl.constexpr, TABLE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                 SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering (Triton matmul tutorial): GROUP_M row tiles in a row reuse weight tiles from L2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % rows_in_group
    pid_n = (pid % tiles_per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    table = TABLE(meta_ptr, offs_n, mask_n, BITS, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_last")
        u = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
        w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS, ATOMIC)


@triton.jit
def _dequant_kernel(w_ptr, meta_ptr, zs_ptr, out_ptr, N, K, rows_per_bit,
                    DEQUANT: tl.constexpr, TABLE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    ASYM: tl.constexpr, SCALE_ROW: tl.constexpr, OUT_KN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W tile -> out: [K, N] (OUT_KN, the matmul path: the store runs along N like the loads) or [N, K]."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    table = TABLE(meta_ptr, offs_n, mask_n, BITS, BLOCK_N)
    u = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
    w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW)
    if OUT_KN:
        ptrs = out_ptr + offs_k[:, None] * N + offs_n[None, :]
    else:
        ptrs = out_ptr + offs_n[None, :] * K + offs_k[:, None]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


INTERPRETED = type(_decode_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


# --------------------------------------------------------------------------------------------
# configs

MAX_CANDIDATES = 16  # bounded tuning: a key is timed over at most this many configs
SCHEDULES = ("decode", "gemm", "dequant", "tinygemm")  # tinygemm: torch's int4 kernel (tinygemm.py), via the dispatcher
LUT_MODES = ("global", "registers")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one schedule (``decode``, ``gemm`` or ``dequant``; ``tinygemm`` is torch's
    int4 kernel, which the dispatcher runs for 4-bit group weights where a table chose it).

    ``lut`` only matters for codebook weights: ``global`` gathers each weight's entry from the
    L1-resident table in global memory, ``registers`` keeps the program's [BLOCK_N, 2**bits]
    table in registers and uses ``tl.gather`` (lut.py)."""

    schedule: str
    block_m: int = 16  # decode: rows per program (all of M); gemm: the M tile
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1  # decode / gemm
    group_m: int = 8  # gemm only
    num_warps: int = 4
    num_stages: int = 2
    lut: str = "global"
    unroll: int = 1  # decode, uniform on CUDA cores: K-tiles accumulated between reductions (uniform._uniform_rows)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.block_k < 16:
            raise ValueError("block_k must be >= 16 (and a multiple of min_block_k(bits) for the weight it runs)")
        if self.schedule == "gemm" and min(self.block_m, self.block_n) < 16:
            raise ValueError("tl.dot needs block_m, block_n >= 16")
        if self.schedule == "decode" and self.block_m >= 16 and self.block_n < 16:
            raise ValueError("decode with block_m >= 16 uses tl.dot: block_n must be >= 16")
        if self.split_k < 1:
            raise ValueError("split_k must be >= 1")
        if self.lut not in LUT_MODES:
            raise ValueError(f"lut={self.lut!r}; expected one of {LUT_MODES}")
        if self.unroll not in (1, 2, 4, 8):
            raise ValueError(f"unroll={self.unroll}; expected 1, 2, 4 or 8")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "KernelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def schedule_for(m: int) -> str:
    """The heuristic schedule by rows of x (the shipped tables override it per shape)."""
    if m <= DECODE_MAX_M:
        return "decode"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def min_block_k(bits: int) -> int:
    """Smallest K-tile holding whole packed words of every plane: 32 codes when there is a 1-bit
    plane (odd widths), 16 for 2/6-bit, 8 for 4-bit, 4 for 8-bit."""
    return 32 // (bits & -bits)


def decode_warps(block_m: int, block_n: int) -> int:
    """Warps of a decode program: on CUDA cores four columns per thread (BLOCK_N / 128), so each
    thread's x conversion and address arithmetic serve four columns -- sm_90 SASS at 4 bits: 5.7
    instructions per weight at 512 columns x 4 warps or 128 x 1, 9.3 at 128 x 4 -- which is also
    what gemlite's Hopper GEMV winners use (128/256/512 columns with 1/2/4 warps). tl.dot: 4."""
    return max(1, min(8, block_n // 128)) if block_m < 16 else 4


def decode_block_k(block_m: int, group_size: int, bits: int) -> int:
    """K-tile of the decode kernel. CUDA-core rows (BLOCK_M < 16): lean, 16 codes (32 for odd
    widths, whose 1-bit plane holds 32 per word) -- gemlite's Hopper GEMV winners take 16
    K-elements per program, and ptxas (sm_90) gives our 4-bit decode 72 registers at 16 deep for
    128..512 columns against 162 at 64 deep x 128 columns, i.e. more programs resident per SM to
    keep loads in flight. tl.dot rows (BLOCK_M = 16): 64, dividing the group when possible."""
    if block_m < 16:
        return max(16, min_block_k(bits))
    return max(min_block_k(bits), _block_k_for(group_size, 64))


def _block_k_for(group_size: int, preferred: int) -> int:
    """``preferred``, shrunk to a power of two >= 16 dividing the group so scales load as one row."""
    if group_size == -1:
        return preferred
    block = preferred
    while block > 16 and group_size % block:
        block //= 2
    return block


def split_k_for(tiles: int, k: int, block_k: int, target_programs: int, cap: int = 1 << 30) -> int:
    """The fewest power-of-two K-splits with tiles * split >= target_programs, but at most ``cap``
    and the number of K-tiles."""
    k_tiles = triton.cdiv(k, block_k)
    wanted = triton.next_power_of_2(max(1, -(-target_programs // max(tiles, 1))))
    return max(1, min(wanted, _pow2_floor(k_tiles), _pow2_floor(cap)))


def decode_split_cap(m: int, k: int, bits: int) -> int:
    """Most K-splits worth having at decode (at most 64): the fp32 partials, written and read back
    (8 bytes per split, row and column; they stay in L2), under half the packed weight (K * bits / 8
    bytes per column)."""
    return max(1, min(64, (k * bits) // (128 * max(m, 1))))


def decode_block_m(m: int) -> int:
    """Rows per decode program: all of M; CUDA cores up to 4 rows, tensor cores (16) above."""
    return triton.next_power_of_2(max(m, 1)) if m <= 4 else 16


@functools.cache
def _cuda_sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index)
    return 132  # H100 SXM


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device, bits: int = 4) -> KernelConfig:
    """A sound config without a table entry or tuning: ``gpu_config`` for this device's SM count;
    under the interpreter the fewest, largest tiles (programs run one after another in Python)."""
    if INTERPRETED:
        schedule = schedule_for(m)
        block_n, block_k = min(128, max(16, triton.next_power_of_2(n))), min(128, max(32, triton.next_power_of_2(k)))
        if schedule == "decode":
            return KernelConfig("decode", decode_block_m(m), block_n, block_k)
        return KernelConfig(schedule, min(128, max(16, triton.next_power_of_2(m))), block_n, block_k)
    return gpu_config(m, n, k, group_size, sm_count(device), bits)


def gpu_config(m: int, n: int, k: int, group_size: int, sms: int, bits: int = 4) -> KernelConfig:
    """The heuristic behind the shipped tables (the kernels' structure, before any measurement).

    decode: all M rows in one program; on CUDA cores BLOCK_N 512 halved down to 128 (tensor-core
    rows: 64 down to 32) until the N-tiles times the split cap give two programs per SM, four
    columns per thread (``decode_warps``); then split-K up to that many programs, capped so the
    partials stay small (``decode_split_cap``). gemm below DEQUANT_MIN_M, dequantize + cuBLAS above.
    """
    schedule = schedule_for(m)
    target = 2 * sms
    if schedule == "decode":
        block_m = decode_block_m(m)
        cap = decode_split_cap(m, k, bits)
        block_n = 512 if block_m < 16 else 64
        while block_n > (128 if block_m < 16 else 32) and triton.cdiv(n, block_n) * cap < target:
            block_n //= 2
        block_k = decode_block_k(block_m, group_size, bits)
        split = split_k_for(triton.cdiv(n, block_n), k, block_k, target, cap)
        return KernelConfig("decode", block_m, block_n, block_k, split_k=split, num_warps=decode_warps(block_m, block_n),
                            num_stages=2)
    if schedule == "dequant":
        return KernelConfig("dequant", block_n=128, block_k=64, num_warps=4, num_stages=1)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n, block_k = 64, max(min_block_k(bits), _block_k_for(group_size, 64))
    split = split_k_for(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, target)
    return KernelConfig("gemm", block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=3)


def candidate_configs(m: int, n: int, k: int, group_size: int, device: torch.device, bits: int = 4,
                      lut: bool = False) -> list[KernelConfig]:
    """The pruned autotuning space (at most MAX_CANDIDATES, so tuning a shape takes seconds, not minutes).

    decode: BLOCK_N 512/256/128 (gemlite's Hopper GEMV winners are 128-512 wide) x the split that
    fills the GPU, half and double of it, four (or two) columns per thread, the lean K-tile and one
    64 deep, uniform
    CUDA-core rows also 4 tiles unrolled between reductions (``unroll``); codebooks also try
    ``lut="registers"``.
    M > 16: the fused tile (tiled and split-K, two tile sizes) against dequantize + cuBLAS. On a GPU,
    4-bit weights with groups of 32..256 also try torch's int4 tinygemm (``tinygemm.py``).
    """
    first = default_config(m, n, k, group_size, device, bits)
    configs = [first]
    target = 2 * sm_count(device)
    block_k = max(min_block_k(bits), _block_k_for(group_size, 64))
    if first.schedule == "decode":  # most telling first: a truncated list still spans the space
        cap = decode_split_cap(m, k, bits)
        widths = (512, 256, 128) if first.block_m < 16 else (64, 128, 32)

        def split_for(block_n):
            return split_k_for(triton.cdiv(n, block_n), k, block_k, target, cap)

        lean = decode_block_k(first.block_m, group_size, bits)
        deep = max(lean, _block_k_for(group_size, 64))
        unroll = 1 if lut or first.block_m >= 16 else 4

        def warps(bn):
            return decode_warps(first.block_m, bn)

        shapes = [(bn, split_for(bn), warps(bn), lean, unroll) for bn in widths[:2]]
        shapes += [(bn, split_for(bn), warps(bn), lean, 1) for bn in widths]
        shapes += [(widths[0], split_for(widths[0]), warps(widths[0]), deep, 1)]
        shapes += [(bn, split_for(bn), 2 * warps(bn), lean, 1) for bn in widths]
        shapes += [(bn, s, warps(bn), lean, 1) for bn in widths[:2] for s in (min(2 * split_for(bn), cap), max(1, split_for(bn) // 2))]
        for block_n, split_k, warps, depth, tiles in shapes:
            for mode in (("global", "registers") if lut else ("global",)):
                configs.append(KernelConfig("decode", first.block_m, block_n, depth, split_k, num_warps=warps, lut=mode,
                                            unroll=tiles))
    else:
        block_m = min(64, max(16, triton.next_power_of_2(m))) if m < 128 else 128
        for block_n in (64, 128):
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            for split_k in sorted({1, split_k_for(tiles, k, block_k, target)}):
                for warps, stages in ((4, 3), (8, 4)):
                    configs.append(KernelConfig("gemm", block_m, block_n, block_k, split_k, num_warps=warps, num_stages=stages))
        configs += [KernelConfig("dequant", block_n=bn, block_k=64, num_warps=w, num_stages=1) for bn, w in ((128, 4), (256, 8))]
    if device.type == "cuda" and not lut and bits == 4 and group_size in (32, 64, 128, 256):
        configs.insert(1, KernelConfig("tinygemm"))  # torch's int4 kernel competes where it serves the format
    seen, unique = set(), []
    for config in configs:
        if config not in seen:
            seen.add(config)
            unique.append(config)
    return unique[:MAX_CANDIDATES]


# --------------------------------------------------------------------------------------------
# launch wrappers

_counters: dict = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-column arrival counters of the serial split-K decode (all zero between launches).

    One buffer per (device, stream): launches on one stream run one after another, and each leaves
    the counters at zero. Zeroed once when created (or grown)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _counters.get(key)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 16384), dtype=torch.int32, device=device)
        _counters[key] = counters
    return counters


def _dot_type(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16:
        return (tl.float32 if INTERPRETED else tl.bfloat16), "tf32"
    if dtype == torch.float32:
        return tl.float32, "ieee"
    raise TypeError(f"activations must be fp16, bf16 or fp32, got {dtype}")


def quantized_matmul(x, packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant,
                     bias=None, config: KernelConfig | None = None, outliers: PackedOutliers | None = None,
                     table=no_table):
    """y = x W^T (+ S x) (+ bias) for x [M, K]; W given by packed codes + ``dequant`` metadata.

    ``meta`` is the scales [G, N] (uniform) or the LUT [N, 2**bits]; ``zs`` the fp32 [G, N]
    zero shift or None; ``table`` what a program keeps in registers across its K loop. Used by
    ``uniform_linear`` and ``lut.lut_linear``.
    """
    m, k = x.shape
    n = shape[0]
    if k != shape[1]:
        raise ValueError(f"x has {k} features, the weight expects {shape[1]}")
    config = config or default_config(m, n, k, group_size, x.device, bits)
    if config.schedule == "tinygemm":
        raise ValueError("tinygemm is not a Triton schedule: compressor.kernels.triton_linear runs it")
    if config.block_k % min_block_k(bits):
        raise ValueError(f"block_k={config.block_k} splits a packed word of a {bits}-bit code (min_block_k = {min_block_k(bits)})")
    if m == 0:
        return x.new_empty(0, n)
    if config.schedule == "dequant":
        weight = dequantize_weight(packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant,
                                   x.dtype, config, outliers, table, kn=True)
        if bias is None:
            return torch.mm(x, weight)
        return torch.addmm(bias.to(x.dtype), x, weight)

    block_k = config.block_k
    common = dict(DEQUANT=dequant, TABLE=table, BITS=bits, GROUP=group_size, ASYM=zs is not None,
                  SCALE_ROW=group_size == -1 or group_size % block_k == 0,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    zs_arg = zs if zs is not None else meta
    dot_dtype, precision = _dot_type(x.dtype)
    if config.schedule == "decode":
        if m > config.block_m:
            raise ValueError(f"the decode schedule takes all M rows in one program: M={m} > block_m={config.block_m}")
        if outliers is not None:
            epilogue = ATOMIC
        else:
            epilogue = SERIAL if config.split_k > 1 else STORE
        if epilogue == ATOMIC:
            out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        else:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        part = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device) if epilogue == SERIAL else out
        counts = arrival_counters(x.device, n) if epilogue == SERIAL else out
        grid = (triton.cdiv(n, config.block_n), config.split_k)
        _decode_kernel[grid](x, packed_codes, meta, zs_arg, bias if bias is not None else out, out, part, counts,
                             m, n, k, rows_per_bit, x.stride(0), x.stride(1), config.split_k,
                             HAS_BIAS=bias is not None, EPILOGUE=epilogue, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                             FACTOR=dequant is dequant_affine and common["SCALE_ROW"], UNROLL=config.unroll,
                             BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, **common)
        if epilogue != ATOMIC:
            return out
    else:
        atomic = config.split_k > 1 or outliers is not None
        if atomic:
            out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        else:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
        _gemm_kernel[grid](x, packed_codes, meta, zs_arg, bias if bias is not None else out, out,
                           m, n, k, rows_per_bit, x.stride(0), x.stride(1), config.split_k,
                           HAS_BIAS=bias is not None, ATOMIC=atomic, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                           BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
                           GROUP_M=config.group_m, **common)
        if not atomic:
            return out
    if outliers is not None:
        outlier_add(x, outliers, out)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def dequantize_weight(packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant, dtype,
                      config: KernelConfig | None = None, outliers: PackedOutliers | None = None,
                      table=no_table, kn: bool = False) -> torch.Tensor:
    """Dense W in ``dtype`` (one pass over the packed codes), outliers scattered in: [N, K], or its
    transpose [K, N] stored contiguously when ``kn`` (what the matmul path multiplies by)."""
    n, k = shape
    config = config if config is not None and config.schedule == "dequant" else KernelConfig("dequant", block_n=64, block_k=64)
    if config.block_k % min_block_k(bits):
        raise ValueError(f"block_k={config.block_k} splits a packed word of a {bits}-bit code (min_block_k = {min_block_k(bits)})")
    weight = torch.empty((k, n) if kn else (n, k), dtype=dtype, device=packed_codes.device)
    grid = (triton.cdiv(k, config.block_k), triton.cdiv(n, config.block_n))
    _dequant_kernel[grid](packed_codes, meta, zs if zs is not None else meta, weight, n, k, rows_per_bit,
                          DEQUANT=dequant, TABLE=table, BITS=bits, GROUP=group_size, ASYM=zs is not None,
                          SCALE_ROW=group_size == -1 or group_size % config.block_k == 0, OUT_KN=kn,
                          BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                          num_warps=config.num_warps, num_stages=config.num_stages)
    if outliers is not None and outliers.nnz:
        index = (outliers.cols.long(), outliers.rows.long()) if kn else (outliers.rows.long(), outliers.cols.long())
        weight.index_put_(index, outliers.vals.to(dtype), accumulate=True)
    return weight


def uniform_dequantize(packed: PackedUniform, dtype=torch.float16, config: KernelConfig | None = None,
                       outliers: PackedOutliers | None = None) -> torch.Tensor:
    """Dense [N, K] uniform weight through the dequantize kernel."""
    return dequantize_weight(packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.scales,
                             packed.zs, packed.group_size, dequant_affine, dtype, config, outliers)


def uniform_linear(x: torch.Tensor, packed: PackedUniform, bias=None, config: KernelConfig | None = None,
                   outliers: PackedOutliers | None = None) -> torch.Tensor:
    """y = x W^T (+ S x) (+ bias) for x [M, K] and uniform weights in the kernel layout."""
    return quantized_matmul(x, packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.scales,
                            packed.zs, packed.group_size, dequant_affine, bias, config, outliers)
