"""The dequantize + cuBLAS schedule (the heuristic's choice from M = 64, or wherever a table says it is
faster): one pass writes W in x's dtype in the packed layout's own order ``[K, N]`` (reads and
writes are both N-contiguous, no transpose through shared memory), then one cuBLAS call
``addmm(bias, x, W_kn)`` (cuBLAS takes the transposed operand natively). ``dequantize_weight`` also
serves the public ``dequantize()``, which returns ``[N, K]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.codes import load_codes, no_table
from compressor.kernels.heuristics import check_block_k
from compressor.kernels.packing import PackedOutliers
from compressor.kernels.tables import KernelConfig


@triton.jit
def _dequant_kernel(
    w_ptr,
    meta_ptr,
    zs_ptr,
    out_ptr,
    N,
    K,
    rows_per_bit,
    DEQUANT: tl.constexpr,
    TABLE: tl.constexpr,
    BITS: tl.constexpr,
    TENS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
    OUT_KN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W tile -> out: [K, N] (OUT_KN, the matmul path: the store runs along N like the loads) or [N, K]."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    table = TABLE(meta_ptr, offs_n, mask_n, BITS, BLOCK_N)
    u = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N, TENS)
    w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, table, N, BITS, GROUP, ASYM, SCALE_ROW)
    if OUT_KN:
        ptrs = out_ptr + offs_k[:, None] * N + offs_n[None, :]
    else:
        ptrs = out_ptr + offs_n[None, :] * K + offs_k[:, None]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def dequantize_weight(
    packed_codes,
    rows_per_bit,
    shape,
    bits,
    meta,
    zs,
    group_size,
    dequant,
    dtype,
    config: KernelConfig | None = None,
    outliers: PackedOutliers | None = None,
    table=no_table,
    kn: bool = False,
    layout: str = "planes",
) -> torch.Tensor:
    """Dense W in ``dtype`` (one pass over the packed codes), outliers scattered in: [N, K], or its
    transpose [K, N] stored contiguously when ``kn`` (what the matmul path multiplies by)."""
    n, k = shape
    if config is None or config.schedule != "dequant":
        config = KernelConfig("dequant", block_n=64, block_k=64)
    check_block_k(config, bits)
    weight = torch.empty((k, n) if kn else (n, k), dtype=dtype, device=packed_codes.device)
    grid = (triton.cdiv(k, config.block_k), triton.cdiv(n, config.block_n))
    _dequant_kernel[grid](
        packed_codes,
        meta,
        zs if zs is not None else meta,
        weight,
        n,
        k,
        rows_per_bit,
        DEQUANT=dequant,
        TABLE=table,
        BITS=bits,
        TENS=layout == "tens",
        GROUP=group_size,
        ASYM=zs is not None,
        SCALE_ROW=group_size == -1 or group_size % config.block_k == 0,
        OUT_KN=kn,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if outliers is not None and outliers.nnz:
        index = (outliers.cols.long(), outliers.rows.long()) if kn else (outliers.rows.long(), outliers.cols.long())
        weight.index_put_(index, outliers.vals.to(dtype), accumulate=True)
    return weight


def dequant_matmul(
    x,
    packed_codes,
    rows_per_bit,
    shape,
    bits,
    meta,
    zs,
    group_size,
    dequant,
    bias,
    config,
    outliers: PackedOutliers | None,
    table,
    layout: str = "planes",
) -> torch.Tensor:
    """y = x W^T (+ bias) through the dense W [K, N] (outliers scattered in) and one cuBLAS call."""
    weight = dequantize_weight(
        packed_codes,
        rows_per_bit,
        shape,
        bits,
        meta,
        zs,
        group_size,
        dequant,
        x.dtype,
        config,
        outliers,
        table,
        kn=True,
        layout=layout,
    )
    if bias is None:
        return torch.mm(x, weight)
    return torch.addmm(bias.to(x.dtype), x, weight)
