"""Triton kernels for y = x W^T with lookup-table (non-uniform) weights: w[n, k] = lut[n, code].

Source: SqueezeLLM (arXiv 2306.07629; SqueezeAILab/SqueezeLLM ``squeezellm/quant.py``,
``quant_cuda_kernel.cu``): every output row has its own codebook of 2**bits centroids, and the
kernel is a GEMV that unpacks a code and reads the row's table. Its CUDA kernel copies each
block's table slice to shared memory.

The codes use the same planes layout as the uniform kernels (``packing.py``) and the same
schedules (``decode.py``, ``gemm.py``, ``dequant.py``, launched by ``uniform.quantized_matmul``),
with the lookup plugged in as their ``DEQUANT`` constexpr function. Why the first version was 4-5x
slower than uniform 4-bit at M = 1 on an H200, and what changed (docs/KERNELS.md, "Lookup tables
and 3-bit"):

* it loaded the codes as a [BLOCK_K, BLOCK_N] tile of repeated word addresses (one load per code);
  the codes now come from the compact loads shared with the uniform kernels;
* each weight's entry is a gather. Two ways, chosen per shape by the config's ``lut`` field:
  ``global`` gathers from the [N, 2**bits] table in global memory (L1-resident: BLOCK_N * 2**bits
  * 2 bytes per program, 8 KB at 4 bits and BLOCK_N = 256), one address per weight;
  ``registers`` loads the program's [BLOCK_N, 2**bits] slice once, before the K loop, and
  gathers with ``tl.gather`` (warp shuffles or shared memory, as Triton lowers it), so the K loop
  touches no table memory at all. Which is faster is measured by the device check
  (``benchmarks/kernel_speed.py --device-check``) and recorded in the shipped tables.

No group metadata. Outliers (``sparse.py``) add to these kernels exactly as to the uniform ones.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from compressor.kernels.codes import INTERPRETED, no_table
from compressor.kernels.dequant import dequantize_weight
from compressor.kernels.heuristics import codebook_config, default_config
from compressor.kernels.packing import PackedLUT, PackedOutliers
from compressor.kernels.tables import KernelConfig
from compressor.kernels.uniform import quantized_matmul


@triton.jit
def dequant_lut(
    u,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    k0,
    lut_ptr,
    unused_ptr,
    table,
    N,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
):
    """fp32 weights lut[n, u[k, n]] gathered from global memory (same signature as
    ``codes.dequant_affine``; the group arguments are unused)."""
    entries = lut_ptr + offs_n[None, :] * (1 << BITS) + u
    return tl.load(entries, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)


@triton.jit
def lut_table(lut_ptr, offs_n, mask_n, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's [BLOCK_N, 2**BITS] slice of the codebooks, loaded once (fp32, in registers)."""
    entries = tl.arange(0, 1 << BITS)
    return tl.load(lut_ptr + offs_n[:, None] * (1 << BITS) + entries[None, :], mask=mask_n[:, None], other=0.0).to(
        tl.float32
    )


@triton.jit
def dequant_lut_registers(
    u,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    k0,
    lut_ptr,
    unused_ptr,
    table,
    N,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
):
    """fp32 weights lut[n, u[k, n]] gathered from the register table of ``lut_table``."""
    return tl.trans(tl.gather(table, tl.trans(u), 1))


def _kernels(config: KernelConfig | None):
    if config is not None and config.lut == "registers":
        return dequant_lut_registers, lut_table
    return dequant_lut, no_table


def lut_linear(
    x: torch.Tensor,
    packed: PackedLUT,
    bias=None,
    config: KernelConfig | None = None,
    outliers: PackedOutliers | None = None,
) -> torch.Tensor:
    """y = x W^T (+ S x) (+ bias) for x [M, K] and codebook weights in the kernel layout."""
    config = config or lut_default_config(x.shape[0], packed, x.device)
    if shared_applies(config, packed, x, outliers):
        from compressor.kernels.lut_shared import shared_lut_decode

        return shared_lut_decode(x, packed, bias, config)
    if config.lut == "shared":  # as the code-major decode, four columns per thread (its spill-free width)
        config = replace(config, lut="codemajor", num_warps=max(1, min(8, config.block_n // 128)))
    dequant, table = _kernels(config)
    codemajor = codemajor_applies(config, packed)
    return quantized_matmul(
        x,
        packed.packed,
        packed.rows_per_bit,
        packed.shape,
        packed.bits,
        packed.table if codemajor else packed.lut,
        None,
        -1,
        dequant,
        bias,
        config,
        outliers,
        table,
        log_np=packed.log_np if codemajor else 0,
    )


def codemajor_applies(config: KernelConfig, packed: PackedLUT) -> bool:
    """Does this config run the code-major table path (decode on CUDA cores, a table packed)? The
    shared-memory mode runs it too where its own kernel does not apply (``shared_applies``)."""
    return (
        config.lut in ("codemajor", "shared")
        and config.schedule == "decode"
        and config.block_m < 16
        and packed.log_np > 0
    )


def shared_applies(config: KernelConfig, packed: PackedLUT, x: torch.Tensor, outliers) -> bool:
    """Does this call run the Gluon shared-memory decode (``lut_shared.py``): ``lut="shared"``, one row,
    4-bit codes with a code-major table, no outliers, on a GPU (neither Gluon nor its inline PTX runs
    in the Triton interpreter, where the same sums come from the code-major Triton decode)?"""
    return (
        config.lut == "shared"
        and config.schedule == "decode"
        and x.shape[0] == 1
        and packed.bits == 4
        and packed.log_np > 0
        and outliers is None
        and x.is_cuda
        and not INTERPRETED
    )


def lut_default_config(m: int, packed: PackedLUT, device) -> KernelConfig:
    """The heuristic config, with the code-major table for decode on CUDA cores where one is packed."""
    config = default_config(m, packed.shape[0], packed.shape[1], -1, device, packed.bits)
    return codebook_config(config, packed.bits) if packed.log_np > 0 else config


def lut_dequantize(
    packed: PackedLUT, dtype=torch.float16, config: KernelConfig | None = None, outliers: PackedOutliers | None = None
) -> torch.Tensor:
    """Dense [N, K] codebook weight through the dequantize kernel."""
    dequant, table = _kernels(config)
    return dequantize_weight(
        packed.packed,
        packed.rows_per_bit,
        packed.shape,
        packed.bits,
        packed.lut,
        None,
        -1,
        dequant,
        dtype,
        config,
        outliers,
        table,
    )
