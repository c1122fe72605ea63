"""The decode schedule (M <= 16): ONE launch per linear, the weight read once.

All M rows in one program, CUDA cores for BLOCK_M < 16 (``sum(x[:, :, None] * w[None], 1)``;
uniform weights whose K-tiles lie inside one group take ``_uniform_rows``), ``tl.dot`` at
BLOCK_M = 16. The reduction may be split over SPLIT_K programs; the split is reduced *serially*
instead of with atomics into a zeroed workspace: every program stores its fp32 partial in
``part[split, m, n]`` (``torch.empty``: nothing to zero), then increments a per-column arrival
counter; the program that arrives last for a column sums the SPLIT_K partials, adds the bias,
writes x's dtype and resets the counter to 0 for the next launch (CUTLASS's "serial split-K"
semaphore, per column). No zero-fill kernel, no cast kernel. SPLIT_K is a runtime argument (one
compiled kernel serves every split; only "split or not" is compile-time). The counters are one
int32 per output column, zeroed once per (device, stream) and left at zero by every launch
(``arrival_counters``). Sparse outliers (dense-and-sparse, with CSR row pointers) are added inside
the same launch: each split adds its share of the N-tile's outlier run into its own partial
(``_add_outliers``) before the serial reduction. 3-bit "tens" codes and code-major codebooks take
their own CUDA-core loops (``codes.tens_products``, ``codes.codebook_products``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.codes import (
    affine_values,
    codebook_products,
    dequant_affine,
    load_codes,
    load_mantissas,
    plane_products,
    scale_row,
    store_output,
    tens_products,
)


@triton.jit
def _uniform_rows(
    x_ptr,
    w_ptr,
    scale_ptr,
    zs_ptr,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    pid_k,
    SPLIT_K,
    K,
    N,
    rows_per_bit,
    stride_xm,
    stride_xk,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
    TENS: tl.constexpr,
    FIELDS: tl.constexpr,
    EVEN_K: tl.constexpr,
):
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
    version's gemv took 8.5-11. EVEN_K (K a multiple of the unit, ``unit_tiles``): the field decode
    loads x and the code words without masks."""
    if GROUP > 0 and GROUP // BLOCK_K < UNROLL:
        TILES: tl.constexpr = GROUP // BLOCK_K
    else:
        TILES: tl.constexpr = UNROLL
    units = tl.cdiv(tl.cdiv(K, BLOCK_K), TILES)
    per = tl.cdiv(units, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for unit in range(pid_k * per, tl.minimum(units, pid_k * per + per)):
        g0 = unit * (TILES * BLOCK_K)
        if TENS or FIELDS:  # one AND and one FMA per code (``codes.tens_products``, ``codes.plane_products``)
            if x_ptr.dtype.element_ty == tl.float16:  # the products are x u 2**-C (see tens_products)
                C: tl.constexpr = 40
            else:
                C: tl.constexpr = 64
            summed = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
            for tile in tl.static_range(TILES):
                k0 = g0 + tile * BLOCK_K
                if TENS:
                    summed, x_sum = tens_products(
                        summed,
                        x_sum,
                        x_ptr,
                        w_ptr,
                        k0,
                        offs_m,
                        mask_m,
                        offs_n,
                        mask_n,
                        rows_per_bit,
                        K,
                        N,
                        stride_xm,
                        stride_xk,
                        C,
                        BLOCK_K,
                        EVEN_K,
                    )
                else:
                    summed, x_sum = plane_products(
                        summed,
                        x_sum,
                        x_ptr,
                        w_ptr,
                        k0,
                        offs_m,
                        mask_m,
                        offs_n,
                        mask_n,
                        rows_per_bit,
                        K,
                        N,
                        stride_xm,
                        stride_xk,
                        C,
                        BITS,
                        BLOCK_K,
                        EVEN_K,
                    )
            xu = summed * (2.0**C)
        elif TILES == 1:  # reduce the tile's products directly (lets the compiler fuse them into FMAs)
            offs_k = g0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_k < K)[None, :],
                other=0.0,
                eviction_policy="evict_last",
            ).to(tl.float32)
            v = load_mantissas(w_ptr, g0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
            summed = tl.sum(x[:, :, None] * v[None, :, :], axis=1)
            x_sum = tl.sum(x, axis=1)[:, None]
        else:
            products = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
            x_sums = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for tile in tl.static_range(TILES):
                k0 = g0 + tile * BLOCK_K
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                ).to(tl.float32)
                v = load_mantissas(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
                products += x[:, :, None] * v[None, :, :]
                x_sums += x
            summed = tl.sum(products, axis=1)
            x_sum = tl.sum(x_sums, axis=1)[:, None]
        if not (TENS or FIELDS):
            xu = (summed - x_sum) * (1 << BITS)  # sum_k x u
        s, zs = scale_row(scale_ptr, zs_ptr, g0, offs_n, mask_n, N, GROUP, ASYM)
        if ASYM:  # zs = -z * s
            acc += xu * s[None, :] + x_sum * zs[None, :]
        else:
            acc += (xu - (1 << (BITS - 1)) * x_sum) * s[None, :]
    return acc


STORE, SERIAL, ATOMIC = 0, 1, 2  # decode epilogues (the kernel spells them as literals)


@triton.jit
def _add_outliers(
    x_ptr,
    crow_ptr,
    rows_ptr,
    cols_ptr,
    vals_ptr,
    part_ptr,
    offs_m,
    mask_m,
    pid_n,
    pid_k,
    SPLIT_K,
    M,
    N,
    stride_xm,
    stride_xk,
    BLOCK_N: tl.constexpr,
):
    """part[pid_k, m, row] += val * x[m, col] for the outliers of N-tile pid_n (rows sorted, so its
    entries are one run [crow[n0], crow[n0 + BLOCK_N])), the run split over the SPLIT_K programs.
    SqueezeLLM's sparse part inside the one decode launch: no zeroed workspace, no second kernel."""
    n0 = pid_n * BLOCK_N
    start = tl.load(crow_ptr + n0)
    end = tl.load(crow_ptr + tl.minimum(n0 + BLOCK_N, N))
    for e0 in range(start + pid_k * 64, end, SPLIT_K * 64):
        offs = e0 + tl.arange(0, 64)
        mask_e = offs < end
        rows = tl.load(rows_ptr + offs, mask=mask_e, other=0)
        cols = tl.load(cols_ptr + offs, mask=mask_e, other=0)
        vals = tl.load(vals_ptr + offs, mask=mask_e, other=0.0).to(tl.float32)
        mask = mask_m[:, None] & mask_e[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        added = x.to(tl.float32) * vals[None, :]
        tl.atomic_add(part_ptr + (pid_k * M + offs_m[:, None]) * N + rows[None, :], added, mask=mask, sem="relaxed")


@triton.jit
def _decode_kernel(
    x_ptr,
    w_ptr,
    meta_ptr,
    zs_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    crow_ptr,
    orows_ptr,
    ocols_ptr,
    ovals_ptr,
    M,
    N,
    K,
    rows_per_bit,
    stride_xm,
    stride_xk,
    SPLIT_K,
    DEQUANT: tl.constexpr,
    TABLE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FACTOR: tl.constexpr,
    UNROLL: tl.constexpr,
    TENS: tl.constexpr,
    LOG_NP: tl.constexpr,
    OUTLIERS: tl.constexpr,
    FIELDS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """M <= BLOCK_M rows against one N-tile and every SPLIT_K-th K-tile (see the module doc)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if FACTOR and BLOCK_M < 16:  # uniform on CUDA cores: ~3 instructions per weight (``_uniform_rows``)
        acc = _uniform_rows(
            x_ptr,
            w_ptr,
            meta_ptr,
            zs_ptr,
            offs_m,
            mask_m,
            offs_n,
            mask_n,
            pid_k,
            SPLIT_K,
            K,
            N,
            rows_per_bit,
            stride_xm,
            stride_xk,
            BITS,
            GROUP,
            ASYM,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UNROLL,
            TENS,
            FIELDS,
            EVEN_K,
        )
    elif LOG_NP > 0 and BLOCK_M < 16:  # codebooks on CUDA cores, code-major table (``codes.codebook_products``)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            acc += codebook_products(
                x_ptr,
                w_ptr,
                meta_ptr,
                k0,
                offs_m,
                mask_m,
                offs_n,
                mask_n,
                rows_per_bit,
                K,
                N,
                stride_xm,
                stride_xk,
                BITS,
                LOG_NP,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
    else:
        table = TABLE(meta_ptr, offs_n, mask_n, BITS, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
            u = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N, TENS)
            if FACTOR:  # uniform on tensor cores, tile inside one group: y += s * (x @ (u - z)), scale once per tile
                v = affine_values(u, BITS, ASYM)
                s, zs = scale_row(meta_ptr, zs_ptr, k0, offs_n, mask_n, N, GROUP, ASYM)
                acc += tl.dot(x.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * s[None, :]
                if ASYM:  # zs = -z * s: + zs * sum_k x
                    acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * zs[None, :]
            else:
                w = DEQUANT(
                    u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW
                )
                if BLOCK_M >= 16:  # tensor cores
                    acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
                else:  # CUDA cores: the weight tile is used BLOCK_M times from registers
                    acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:  # STORE
        store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS)
    elif EPILOGUE == 2:  # ATOMIC: fp32 workspace shared with the outlier kernel
        tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:  # SERIAL: store the partial; the last program to arrive at a column reduces it
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask, cache_modifier=".cg")
        tl.debug_barrier()  # every thread's partial is written before the release below
        if OUTLIERS:  # this split's share of the tile's outliers, added into its own partial
            _add_outliers(
                x_ptr,
                crow_ptr,
                orows_ptr,
                ocols_ptr,
                ovals_ptr,
                part_ptr,
                offs_m,
                mask_m,
                pid_n,
                pid_k,
                SPLIT_K,
                M,
                N,
                stride_xm,
                stride_xk,
                BLOCK_N,
            )
            tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + offs_n, 1, mask=mask_n, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        last = mask_n & (arrived == SPLIT_K - 1)
        mask_last = mask_m[:, None] & last[None, :]
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for split in range(SPLIT_K):
            total += tl.load(
                part_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :],
                mask=mask_last,
                other=0.0,
                cache_modifier=".cg",
            )
        store_output(out_ptr, bias_ptr, total, offs_m, offs_n, mask_last, N, HAS_BIAS)
        tl.store(count_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=last)  # ready for the next launch


_counters: dict = {}


def unit_tiles(group: int, block_k: int, unroll: int) -> int:
    """K-tiles per unit of ``_uniform_rows`` (its TILES): ``unroll``, at most one group's."""
    return max(1, group // block_k) if 0 < group and group // block_k < unroll else unroll


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


def decode_matmul(
    x, packed_codes, rows_per_bit, n, meta, zs, bias, config, common: dict, atomic: bool, log_np: int = 0, outliers=None
) -> torch.Tensor:
    """Launch the decode kernel for x [M, K]: y in x's dtype, or with ``atomic`` (outliers to add) the
    fp32 workspace without the bias. ``zs`` is the kernel's zero-shift argument (``meta`` when there
    is none); ``common`` the constexprs and launch options the fused schedules share; ``log_np`` > 0:
    ``meta`` is a code-major codebook table with rows of 2**log_np (``codes.codebook_products``);
    ``outliers`` (``PackedOutliers`` with ``crow``): added inside the launch (serial epilogue)."""
    m, k = x.shape
    if m > config.block_m:
        raise ValueError(f"the decode schedule takes all M rows in one program: M={m} > block_m={config.block_m}")
    if atomic:
        epilogue = ATOMIC
    else:
        epilogue = SERIAL if config.split_k > 1 or outliers is not None else STORE
    if epilogue == ATOMIC:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device) if epilogue == SERIAL else out
    counts = arrival_counters(x.device, n) if epilogue == SERIAL else out
    grid = (triton.cdiv(n, config.block_n), config.split_k)
    _decode_kernel[grid](
        x,
        packed_codes,
        meta,
        zs,
        bias if bias is not None else out,
        out,
        part,
        counts,
        *((outliers.crow, outliers.rows, outliers.cols, outliers.vals) if outliers is not None else (counts,) * 4),
        m,
        n,
        k,
        rows_per_bit,
        x.stride(0),
        x.stride(1),
        config.split_k,
        HAS_BIAS=bias is not None,
        EPILOGUE=epilogue,
        FACTOR=common["DEQUANT"] is dequant_affine and common["SCALE_ROW"],
        UNROLL=config.unroll,
        LOG_NP=log_np,
        OUTLIERS=outliers is not None,
        FIELDS=common["BITS"] in (2, 4, 8) and config.fields,
        EVEN_K=k % (config.block_k * unit_tiles(common["GROUP"], config.block_k, config.unroll)) == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        **common,
    )
    return out
