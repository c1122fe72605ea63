"""Triton kernel for the sparse half of dense-and-sparse weights: ws[m, :] += S x[m, :].

Source: SqueezeLLM (arXiv 2306.07629; SqueezeAILab/SqueezeLLM ``squeezellm/quant.py``,
``quant_cuda_kernel.cu``) keeps 0.05-0.5% of the weights in full precision as a CSR matrix and
adds ``S x`` to the low-bit product; its "balanced" kernel gives every thread the same number of
nonzeros. We get the same balance more simply: the CSR row pointers are expanded to one row index
per entry (COO) once at load time (``packing.pack_outliers``), and each program takes BLOCK
consecutive entries and up to 16 activation rows and atomically adds ``val * x[m, col]`` into the fp32
workspace the dense kernel accumulates into (duplicate rows within a block are fine: every lane's
atomic is applied). The dense kernels call ``outlier_add`` after their own split-K partial sums
and before the final cast, so the result is one fp32 sum. Large M goes through the dequantize
path instead, where the outliers are scattered into the dense weight (``dequant.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compressor.kernels.packing import PackedOutliers

BLOCK_NNZ = 256  # entries per program
MAX_ROWS = 16  # activation rows per program
DENSE_MIN_M = 1024  # standalone sparse weights: above this M, scatter to dense + F.linear


@triton.jit
def _outlier_kernel(
    x_ptr,
    rows_ptr,
    cols_ptr,
    vals_ptr,
    ws_ptr,
    M,
    nnz,
    N,
    stride_xm,
    stride_xk,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    """BLOCK entries of S times ROWS rows of x: the entries' indices are loaded once per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    rows = tl.load(rows_ptr + offs, mask=mask, other=0)
    cols = tl.load(cols_ptr + offs, mask=mask, other=0)
    vals = tl.load(vals_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        m = tl.program_id(1) * ROWS + i
        active = offs < tl.where(m < M, nnz, 0)  # rows past M contribute nothing
        x = tl.load(x_ptr + m * stride_xm + cols * stride_xk, mask=active, other=0.0).to(tl.float32)
        tl.atomic_add(ws_ptr + m * N + rows, vals * x, mask=active, sem="relaxed")


def outlier_add(x: torch.Tensor, outliers: PackedOutliers, ws: torch.Tensor, block: int = BLOCK_NNZ) -> torch.Tensor:
    """ws [M, N] fp32 += x [M, K] S^T, in place; returns ws."""
    if ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError("the outlier workspace must be a contiguous fp32 tensor")
    m = x.shape[0]
    if outliers.nnz and m:
        rows = min(MAX_ROWS, triton.next_power_of_2(m))
        grid = (triton.cdiv(outliers.nnz, block), triton.cdiv(m, rows))
        _outlier_kernel[grid](
            x,
            outliers.rows,
            outliers.cols,
            outliers.vals,
            ws,
            m,
            outliers.nnz,
            outliers.shape[0],
            x.stride(0),
            x.stride(1),
            BLOCK=block,
            ROWS=rows,
        )
    return ws


def outlier_linear(x: torch.Tensor, outliers: PackedOutliers, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x S^T (+ bias) for a weight that is only outliers (``SparseOutliers`` on its own)."""
    if x.shape[0] > DENSE_MIN_M:  # prefill: a dense matmul beats M atomic passes
        dense = torch.zeros(outliers.shape, dtype=x.dtype, device=x.device)
        dense.index_put_((outliers.rows.long(), outliers.cols.long()), outliers.vals.to(x.dtype), accumulate=True)
        return F.linear(x, dense, None if bias is None else bias.to(x.dtype))
    ws = torch.zeros(x.shape[0], outliers.shape[0], dtype=torch.float32, device=x.device)
    outlier_add(x, outliers, ws)
    if bias is not None:
        ws += bias.float()
    return ws.to(x.dtype)
