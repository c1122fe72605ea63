"""The gemm schedule (the heuristic's choice for 16 < M < 64, and any M with sparse outliers where
the table does not say otherwise): ``tl.dot`` on the dequantized tile, grouped-M tile order
(GROUP_M row tiles in a row reuse weight tiles from L2), optional split-K with atomic adds into an
fp32 workspace, or SPLIT_K = 1 storing x's dtype directly.

Uniform weights whose K-tiles lie inside one group (FACTOR) take the scale out of the K loop: the
tile's codes go to ``tl.dot`` as the exact small integers ``u - 2**(b-1)`` (symmetric) or ``u``
(asymmetric), and the product is scaled per column, ``acc += s * (x @ v)`` (+ ``zs * sum_k x``):
one multiply per output element and tile instead of one per weight. Per-channel scales (group -1)
are applied once, after the whole K range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.codes import affine_values, dequant_affine, load_codes, scale_row, store_output


@triton.jit
def _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:  # fp32 workspace; the wrapper adds the bias after the last partial sum
        tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:
        store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS)


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    meta_ptr,
    zs_ptr,
    bias_ptr,
    out_ptr,
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
    TENS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FACTOR: tl.constexpr,
):
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
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
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
        if FACTOR and GROUP == -1:  # per-channel: the scale after the K loop
            v = affine_values(u, BITS, ASYM)
            acc = tl.dot(x.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
            if ASYM:
                x_sum += tl.sum(x.to(tl.float32), axis=1)
        elif FACTOR:  # the tile inside one group: its scale once per output element
            v = affine_values(u, BITS, ASYM)
            s, zs = scale_row(meta_ptr, zs_ptr, k0, offs_n, mask_n, N, GROUP, ASYM)
            acc += tl.dot(x.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * s[None, :]
            if ASYM:
                acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * zs[None, :]
        else:
            w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW)
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if FACTOR and GROUP == -1:
        s, zs = scale_row(meta_ptr, zs_ptr, 0, offs_n, mask_n, N, GROUP, ASYM)
        acc = acc * s[None, :]
        if ASYM:
            acc += x_sum[:, None] * zs[None, :]
    _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS, ATOMIC)


def gemm_matmul(x, packed_codes, rows_per_bit, n, meta, zs, bias, config, common: dict, atomic: bool) -> torch.Tensor:
    """Launch the gemm kernel for x [M, K]: y in x's dtype, or with ``atomic`` (split-K or outliers to
    add) the fp32 workspace without the bias. Arguments as ``decode.decode_matmul``."""
    m, k = x.shape
    if atomic:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
    _gemm_kernel[grid](
        x,
        packed_codes,
        meta,
        zs,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        rows_per_bit,
        x.stride(0),
        x.stride(1),
        config.split_k,
        HAS_BIAS=bias is not None,
        ATOMIC=atomic,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        FACTOR=common["DEQUANT"] is dequant_affine and common["SCALE_ROW"],
        **common,
    )
    return out
