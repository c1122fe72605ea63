"""torch's int4 "tinygemm" (``torch.ops.aten._weight_int4pack_mm``, what torchao's int4 weight-only
layout calls) as one more schedule for the format it serves: uniform 4-bit, groups of 32/64/128/256.

Why: a well-kept kernel that already wins for a format we export may serve it, and at 4-bit decode
it measured faster than our first kernels (the numbers: docs/KERNELS.md). It is chosen only where a
kernel-config table says ``schedule: tinygemm`` (the device check and ``compressor tune`` put it
among the 4-bit candidates), never by default; our own kernels stay the only ones for 3/5/6/7-bit,
codebooks and dense-and-sparse.

Its math: ``w = (u - 8) * s + z`` with a float zero z, so ours (``w = u * s + zs``, ``zs = -z_int * s``)
maps to ``z = zs + 8 * s`` (symmetric: z = 0). It takes bf16 activations (x is cast; y cast back)
and a packed weight whose nibble order torch does not document: both orders are packed and the one
that reproduces our dequantized weight on a probe input is kept; if neither does, the format is
reported unsupported and the Triton kernels run. On a CPU, torch's CPU twins of the same ops
(``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``) run instead, which is
how the tests check it. Plain torch: no triton import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from compressor.kernels.packing import PackedUniform, unpack_codes
from compressor.kernels.reference import dequantize_uniform

GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8
PROBE_TOLERANCE = 2e-2  # bf16 activations and weights: a wrong nibble order is off by ~100 %


@dataclass
class TinygemmWeight:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # bf16 [G, N, 2]
    group_size: int


def supported(dense, x: torch.Tensor) -> bool:
    n, k = getattr(dense, "shape", (0, 0))
    return (
        isinstance(dense, PackedUniform)
        and dense.bits == 4
        and dense.group_size in GROUPS
        and n % 8 == 0
        and k % (INNER_K_TILES * 16) == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    )


def _mm(x: torch.Tensor, weight: TinygemmWeight) -> torch.Tensor:
    op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return op(x, weight.packed, weight.group_size, weight.scales_and_zeros)


def pack(dense: PackedUniform) -> TinygemmWeight | None:
    """Our kernel-side 4-bit tensors in tinygemm's layout, or None if no packing reproduces them."""
    codes = unpack_codes(dense.packed, 4, dense.shape)
    scales = dense.scales.float()  # [G, N]
    zeros = torch.zeros_like(scales) if dense.zs is None else dense.zs + 8 * scales
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    device = codes.device
    if device.type == "cuda":
        candidates = [
            torch.ops.aten._convert_weight_to_int4pack((hi << 4 | lo).contiguous(), INNER_K_TILES)
            for hi, lo in ((codes[:, 0::2], codes[:, 1::2]), (codes[:, 1::2], codes[:, 0::2]))
        ]
    else:
        candidates = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)]
    probe = torch.randn(4, dense.shape[1], generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    expected = probe.float() @ dequantize_uniform(dense).t()
    for packed in candidates:
        weight = TinygemmWeight(packed, scales_and_zeros, dense.group_size)
        error = (_mm(probe, weight).float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
        if error < PROBE_TOLERANCE:
            return weight
    return None


_packed = WeakIdKeyDictionary()


def prepared(dense: PackedUniform) -> TinygemmWeight | None:
    """``pack(dense)``, once per kernel-side weight (None is remembered too)."""
    if dense.packed not in _packed:
        _packed[dense.packed] = (pack(dense),)
    return _packed[dense.packed][0]


def tinygemm_linear(x: torch.Tensor, dense: PackedUniform, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """y = x W^T + bias through tinygemm for x [M, K]; None when this weight cannot go through it."""
    weight = prepared(dense) if supported(dense, x) else None
    if weight is None:
        return None
    y = _mm(x.to(torch.bfloat16).contiguous(), weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
