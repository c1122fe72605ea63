"""Triton kernels for y = x W^T with uniform (affine) low-bit weights, any width 1..8: the launch.

Sources: MARLIN (arXiv 2408.11743) for the memory-bound design at small batch (dequantize inside
the K loop, fp32 accumulation, split the reduction so enough SMs stream weights); Tilus (arXiv
2504.12984) for arbitrary widths as compositions of power-of-two loads; gemlite
(mobiusml/gemlite ``gemv_revsplitK_kernels.py``, ``gemm_splitK_kernels.py``, ``utils.py``) for
the Triton structure: K-packed weights stored N-contiguous, ``w = u * s + zs`` and split-K.

One family, three schedules, one file each (the weight kind is a constexpr ``DEQUANT`` function, so
the LUT kernels in ``lut.py`` are these same schedules with a codebook lookup plugged in):

* ``decode.py`` (M <= 16): one launch per linear, all M rows in one program, serial split-K;
* ``gemm.py`` (M > 16, or any M with sparse outliers): ``tl.dot`` on the dequantized tile;
* ``dequant.py``: one pass writes W as ``[K, N]``, then one cuBLAS call.

``codes.py`` holds the device helpers they share (compact code loads, the exponent tricks, affine
dequantization); ``heuristics.py`` the config a key runs without a table entry (``tables.py``, which
also defines ``KernelConfig``). This module checks a config against the weight and launches the
schedule it names; ``quantized_matmul`` finishes the fp32 workspace of the atomic paths (outliers,
bias, cast).
"""

from __future__ import annotations

import torch

from compressor.kernels.codes import dequant_affine, dot_type, no_table
from compressor.kernels.decode import decode_matmul
from compressor.kernels.dequant import dequant_matmul, dequantize_weight
from compressor.kernels.gemm import gemm_matmul
from compressor.kernels.heuristics import (
    check_block_k,
    default_config,
)
from compressor.kernels.packing import PackedOutliers, PackedUniform
from compressor.kernels.sparse import outlier_add
from compressor.kernels.tables import KernelConfig


def quantized_matmul(
    x,
    packed_codes,
    rows_per_bit,
    shape,
    bits,
    meta,
    zs,
    group_size,
    dequant,
    bias=None,
    config: KernelConfig | None = None,
    outliers: PackedOutliers | None = None,
    table=no_table,
    layout: str = "planes",
    log_np: int = 0,
):
    """y = x W^T (+ S x) (+ bias) for x [M, K]; W given by packed codes (in ``layout``: "planes" or the
    3-bit "tens", ``packing.py``) + ``dequant`` metadata.

    ``meta`` is the scales [G, N] (uniform) or the LUT [N, 2**bits] (with ``log_np`` > 0, the decode
    schedule's code-major fp32 table [2**bits, 2**log_np]); ``zs`` the fp32 [G, N] zero shift or None;
    ``table`` what a program keeps in registers across its K loop. Used by ``uniform_linear`` and
    ``lut.lut_linear``.
    """
    m, k = x.shape
    n = shape[0]
    if k != shape[1]:
        raise ValueError(f"x has {k} features, the weight expects {shape[1]}")
    config = config or default_config(m, n, k, group_size, x.device, bits)
    if config.schedule == "tinygemm":
        raise ValueError("tinygemm is not a Triton schedule: compressor.kernels.triton_linear runs it")
    check_block_k(config, bits)
    if m == 0:
        return x.new_empty(0, n)
    if config.schedule == "dequant":
        return dequant_matmul(
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
            outliers,
            table,
            layout,
        )

    dot_dtype, precision = dot_type(x.dtype)
    common = {
        "DEQUANT": dequant,
        "TABLE": table,
        "BITS": bits,
        "TENS": layout == "tens",
        "GROUP": group_size,
        "ASYM": zs is not None,
        "SCALE_ROW": group_size == -1 or group_size % config.block_k == 0,
        "DOT_DTYPE": dot_dtype,
        "INPUT_PRECISION": precision,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    zs_arg = zs if zs is not None else meta
    if config.schedule == "decode":
        atomic = outliers is not None and outliers.crow is None  # with row pointers: inside the one launch
        fused = None if atomic else outliers
        out = decode_matmul(x, packed_codes, rows_per_bit, n, meta, zs_arg, bias, config, common, atomic, log_np, fused)
    else:
        atomic = config.split_k > 1 or outliers is not None
        out = gemm_matmul(x, packed_codes, rows_per_bit, n, meta, zs_arg, bias, config, common, atomic)
    if not atomic:
        return out
    if outliers is not None:
        outlier_add(x, outliers, out)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def uniform_dequantize(
    packed: PackedUniform,
    dtype=torch.float16,
    config: KernelConfig | None = None,
    outliers: PackedOutliers | None = None,
) -> torch.Tensor:
    """Dense [N, K] uniform weight through the dequantize kernel."""
    return dequantize_weight(
        packed.packed,
        packed.rows_per_bit,
        packed.shape,
        packed.bits,
        packed.scales,
        packed.zs,
        packed.group_size,
        dequant_affine,
        dtype,
        config,
        outliers,
        layout=packed.layout,
    )


def uniform_linear(
    x: torch.Tensor,
    packed: PackedUniform,
    bias=None,
    config: KernelConfig | None = None,
    outliers: PackedOutliers | None = None,
) -> torch.Tensor:
    """y = x W^T (+ S x) (+ bias) for x [M, K] and uniform weights in the kernel layout."""
    return quantized_matmul(
        x,
        packed.packed,
        packed.rows_per_bit,
        packed.shape,
        packed.bits,
        packed.scales,
        packed.zs,
        packed.group_size,
        dequant_affine,
        bias,
        config,
        outliers,
        layout=packed.layout,
    )
