"""Plain torch references for every kernel: unpack, dequantize in fp32, matmul.

Two kinds of reference live here:

* ``*_reference(x, packed, ...)`` read the *kernel-side* tensors (``packing.Packed*``), so a
  kernel test compares the Triton result with the same bits decoded by torch, and a packing bug
  cannot hide behind a matching value type. They compute in fp32 and return fp32.
* ``reference_linear(x, weight, bias)`` works on a value type from ``compressor.weights.values``
  (``weight.dequantize(x.dtype)`` then ``F.linear``). It is the CPU path of ``qlinear`` and
  needs no packing at all; ``exact_linear`` is the same in fp32, the ground truth for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.kernels.packing import (
    PackedLUT,
    PackedOutliers,
    PackedUniform,
    unpack_codes,
    unpack_kernel_codes,
)
from compressor.weights.values import expand_groups


def dequantize_uniform(packed: PackedUniform) -> torch.Tensor:
    """fp32 [N, K] from the kernel-side uniform tensors."""
    n, k = packed.shape
    codes = unpack_kernel_codes(packed.packed, packed.bits, packed.shape, packed.layout).float()
    scales = expand_groups(packed.scales.t().float(), k, packed.group_size)
    if packed.zs is None:
        return (codes - 2 ** (packed.bits - 1)) * scales
    return codes * scales + expand_groups(packed.zs.t(), k, packed.group_size)


def dequantize_lut(packed: PackedLUT) -> torch.Tensor:
    """fp32 [N, K] from the kernel-side LUT tensors."""
    codes = unpack_codes(packed.packed, packed.bits, packed.shape)
    return packed.lut.float().gather(1, codes.long())


def outliers_dense(packed: PackedOutliers) -> torch.Tensor:
    """fp32 [N, K] with the outliers in place (duplicates summed)."""
    dense = torch.zeros(packed.shape, dtype=torch.float32, device=packed.vals.device)
    dense.index_put_((packed.rows.long(), packed.cols.long()), packed.vals.float(), accumulate=True)
    return dense


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.reshape(-1, x.shape[-1]).float() @ weight.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def uniform_reference(x, packed: PackedUniform, bias=None) -> torch.Tensor:
    """fp32 ``x @ W^T + bias`` for the uniform kernels."""
    return _matmul(x, dequantize_uniform(packed), bias)


def lut_reference(x, packed: PackedLUT, bias=None) -> torch.Tensor:
    """fp32 ``x @ W^T + bias`` for the LUT kernels."""
    return _matmul(x, dequantize_lut(packed), bias)


def outlier_reference(x, packed: PackedOutliers) -> torch.Tensor:
    """fp32 ``x @ S^T`` for the sparse outlier kernel."""
    return _matmul(x, outliers_dense(packed), None)


def reference_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU path: dequantize the value type to x's dtype and run a dense matmul."""
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def exact_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth in fp32 (returns fp32): ``x.float() @ W.float()^T + bias``."""
    return _matmul(x, weight.dequantize(torch.float32), bias)
