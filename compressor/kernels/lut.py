"""Triton kernels for y = x W^T with lookup-table (non-uniform) weights: w[n, k] = lut[n, code].

Source: SqueezeLLM (arXiv 2306.07629; SqueezeAILab/SqueezeLLM ``squeezellm/quant.py``,
``quant_cuda_kernel.cu``): every output row has its own codebook of 2**bits centroids, and the
kernel is a GEMV that unpacks a code and reads the row's table. Its CUDA kernel copies each
block's table slice to shared memory; here the table of a BLOCK_N tile (BLOCK_N * 2**bits * 2
bytes, 8 KB at 4 bits and BLOCK_N = 256) is gathered straight from global memory, where it stays
in L1 for the whole K loop (kernels.md section 4, option 1). ``tl.gather`` from registers (option
3) is the thing to benchmark against this on an H100; it is not used until measured.

The codes use the same planes layout as the uniform kernels (``packing.py``), and the schedules
(gemv / split-K gemm / dequantize + cuBLAS) are the uniform ones from ``uniform.py`` with
``dequant_lut`` plugged in as their ``DEQUANT`` constexpr function: no group metadata, one
gathered load per weight. Outliers (``sparse.py``) add to these kernels exactly as to the uniform
ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.packing import PackedLUT, PackedOutliers
from compressor.kernels.uniform import KernelConfig, dequantize_weight, quantized_matmul


@triton.jit
def dequant_lut(u, offs_k, offs_n, mask_k, mask_n, k0, lut_ptr, unused_ptr, N,
                BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, SCALE_ROW: tl.constexpr):
    """fp32 weights lut[n, u[k, n]] for a [BLOCK_K, BLOCK_N] tile of codes (same signature as
    ``uniform.dequant_affine``; the group arguments are unused)."""
    entries = lut_ptr + offs_n[None, :] * (1 << BITS) + u
    return tl.load(entries, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)


def lut_linear(x: torch.Tensor, packed: PackedLUT, bias=None, config: KernelConfig | None = None,
               outliers: PackedOutliers | None = None) -> torch.Tensor:
    """y = x W^T (+ S x) (+ bias) for x [M, K] and codebook weights in the kernel layout."""
    return quantized_matmul(x, packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.lut,
                            None, -1, dequant_lut, bias, config, outliers)


def lut_dequantize(packed: PackedLUT, dtype=torch.float16, config: KernelConfig | None = None,
                   outliers: PackedOutliers | None = None) -> torch.Tensor:
    """Dense [N, K] codebook weight through the dequantize kernel."""
    return dequantize_weight(packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.lut,
                             None, -1, dequant_lut, dtype, config, outliers)
