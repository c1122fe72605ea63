"""Low-bit weight GEMM kernels (Triton) with torch references and a dispatcher.

Contract used by the rest of the toolkit: ``qlinear(x, weight, bias)`` computes ``x @ W^T + bias``
for any quantized value type from ``compressor.quant.formats``, for x of any leading shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qlinear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference path: dequantize to x's dtype and run a dense matmul."""
    return F.linear(x, weight.dequantize(x.dtype), bias)
