"""Low-bit weight GEMM kernels (Triton) with torch references and a dispatcher.

Contract used by the rest of the toolkit: ``qlinear(x, weight, bias)`` computes ``x @ W^T + bias``
for any quantized value type from ``compressor.weights.values``, for x of any leading shape.

* ``packing.py``   planes layout (any width 1..8, K-packed, N-contiguous) and the exact repack of
                   compressed-tensors ``pack-quantized`` tensors
* ``uniform.py``   launch of the Triton schedules for affine weights (``quantized_matmul``)
* ``decode.py``    the one-launch decode schedule (M <= 16, serial split-K)
* ``gemm.py``      the fused tile schedule (``tl.dot``, grouped-M order, split-K)
* ``dequant.py``   dequantize to [K, N], then one cuBLAS call
* ``codes.py``     device helpers the schedules share: code loads, affine dequantization
* ``heuristics.py`` the config without a table entry (``gpu_config``), the tuning candidates
* ``lut.py``       the same schedules for per-row codebooks (SqueezeLLM)
* ``sparse.py``    the sparse outlier add (dense-and-sparse)
* ``tinygemm.py``  torch's int4 kernel for 4-bit group weights, where a config table picks it
* ``reference.py`` plain torch ground truth for each kernel, and the CPU path
* ``dispatch.py``  backend choice, per-layer cache of kernel tensors, config choice
* ``tables.py``    ``KernelConfig``; shipped per-GPU-family config tables (``configs/*.json``) and user tables
* ``tune.py``      the bounded tuner (``COMPRESSOR_AUTOTUNE=on``, ``compressor tune``)
* ``variants.py``  the schedules' kernels and constexprs for compiling ahead of time (sm_90, no GPU)

Importing this package never imports triton; the kernels are imported on first use.
"""

from __future__ import annotations

import torch

from compressor.kernels.dispatch import (
    clear_cache,
    dequantize,
    prepare,
    resolve_backend,
    triton_available,
    triton_linear,
    tuned_configs,
    use_backend,
)
from compressor.kernels.reference import exact_linear, reference_linear

__all__ = [
    "qlinear",
    "dequantize",
    "triton_linear",
    "reference_linear",
    "exact_linear",
    "use_backend",
    "resolve_backend",
    "prepare",
    "clear_cache",
    "tuned_configs",
    "triton_available",
]


def qlinear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias``: Triton kernels on a GPU, the torch reference elsewhere (see dispatch.py)."""
    if resolve_backend(x) == "triton":
        return triton_linear(x, weight, bias)
    return reference_linear(x, weight, bias)
