"""Device helpers every schedule shares (``decode.py``, ``gemm.py``, ``dequant.py``, and ``lut.py``'s
codebook lookups): loading packed codes, turning them into fp32 weights, storing an output tile.

Codes are loaded compactly: each plane's ``BLOCK_K / (32 / width)`` packed words per column are
loaded once and expanded in registers (``words[:, None, :] >> shifts[None, :, None]``, reshaped to
``[BLOCK_K, BLOCK_N]``), instead of gemlite's ``offs_k // per_word`` tile that issues one load per
code and relies on L1 to merge the repeats (8x the load instructions at 4 bits, 32x for the
1-bit plane of 3/5/7-bit codes). Hence BLOCK_K is a multiple of ``min_block_k(bits)``.

Codes become floats without the quarter-rate int->float conversion. Uniform decode on CUDA cores
(``decode._uniform_rows``, the M = 1 path): ``ONE | u << (23 - b)`` read as fp32 is ``1 + u / 2**b``
(``load_mantissas``), so a code costs a shift and a mask-or, and sum_k x u = 2**b (sum_k x v - sum_k x)
exactly; the group's scale and zero are applied once per column. Elsewhere ``u | 0x4B000000`` read
as fp32 is ``2**23 + u`` (Marlin's exponent trick in fp32), and one subtract also removes the
symmetric zero. ``benchmarks/kernel_sass.py`` counts what this leaves per weight in the sm_90 SASS.

Activations are converted right after ``tl.load``: to fp32 on the CUDA-core paths, and to the
``tl.dot`` operand type on the tensor-core path (``dot_type``: bf16 becomes fp32 under
``TRITON_INTERPRET=1``, whose bf16 arithmetic is silently wrong; fp32 uses ``input_precision="ieee"``).

Scales are loaded as one [1, BLOCK_N] row per K-tile when a tile never crosses a group boundary
(``group % BLOCK_K == 0`` or per-channel), else as a [BLOCK_K, BLOCK_N] tile indexed by
``k // group``, so any group size, including groups that do not divide K, is exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2**23: (u | MAGIC) read as fp32 is 2**23 + u for u < 2**23
TWO_23 = tl.constexpr(8388608.0)
ONE = tl.constexpr(0x3F800000)  # fp32 bits of 1.0: (ONE | m << (23 - b)) read as fp32 is 1 + m / 2**b


@triton.jit
def _load_plane(
    w_ptr,
    k0,
    offs_n,
    mask_n,
    rows_per_bit,
    N,
    BITS: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The WIDTH-bit plane of the codes of K-tile [k0, k0 + BLOCK_K), shifted to its place in the
    code: the tile's packed words are loaded once ([BLOCK_K / PER_WORD, BLOCK_N]) and expanded."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    first_row = rows_per_bit * (BITS - (BITS & (2 * WIDTH - 1)))  # the wider planes come first
    rows = k0 // PER_WORD + tl.arange(0, ROWS)
    mask = (rows < rows_per_bit * WIDTH)[:, None] & mask_n[None, :]
    words = tl.load(
        w_ptr + (first_row + rows)[:, None] * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first"
    )
    shifts = tl.arange(0, PER_WORD) * WIDTH
    part = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(part << (BITS & (WIDTH - 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def load_codes(
    w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Unsigned codes [BLOCK_K, BLOCK_N] (int32) of K-tile k0 from the planes layout of ``packing.py``."""
    u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    if BITS & 8:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 8, BLOCK_K, BLOCK_N)
    if BITS & 4:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 4, BLOCK_K, BLOCK_N)
    if BITS & 2:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 2, BLOCK_K, BLOCK_N)
    if BITS & 1:
        u |= _load_plane(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, 1, BLOCK_K, BLOCK_N)
    return u


@triton.jit
def no_table(meta_ptr, offs_n, mask_n, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Uniform weights keep nothing in registers across the K loop (see ``lut.lut_table``)."""
    return 0


@triton.jit
def dequant_affine(
    u,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    k0,
    scale_ptr,
    zs_ptr,
    table,
    N,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    SCALE_ROW: tl.constexpr,
):
    """fp32 weights from codes: (u - 2**(BITS-1)) * s (symmetric) or u * s + zs (zs = -z * s)."""
    if SCALE_ROW:  # the whole K-tile lies in one group: one [1, BLOCK_N] row of metadata
        if GROUP > 0:
            meta = (k0 // GROUP) * N + offs_n[None, :]
        else:
            meta = offs_n[None, :]
        meta_mask = mask_n[None, :]
    else:
        meta = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        meta_mask = mask_k[:, None] & mask_n[None, :]
    s = tl.load(scale_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
    if ASYM:
        return affine_values(u, BITS, ASYM) * s + tl.load(zs_ptr + meta, mask=meta_mask, other=0.0)
    return affine_values(u, BITS, ASYM) * s


@triton.jit
def affine_values(u, BITS: tl.constexpr, ASYM: tl.constexpr):
    """fp32 code values before the group scale: u - 2**(BITS-1) (symmetric) or u (asymmetric)."""
    magic = (u | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + u, exactly
    if ASYM:
        return magic - TWO_23
    return magic - (TWO_23 + (1 << (BITS - 1)))


@triton.jit
def scale_row(scale_ptr, zs_ptr, k0, offs_n, mask_n, N, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """fp32 scale (and zero shift) [BLOCK_N] of the group holding K-tile k0 (SCALE_ROW tiles only)."""
    if GROUP > 0:
        meta = (k0 // GROUP) * N + offs_n
    else:
        meta = offs_n
    s = tl.load(scale_ptr + meta, mask=mask_n, other=0.0).to(tl.float32)
    zs = s
    if ASYM:
        zs = tl.load(zs_ptr + meta, mask=mask_n, other=0.0)
    return s, zs


@triton.jit
def load_mantissas(
    w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """fp32 numbers 1 + u * 2**-BITS [BLOCK_K, BLOCK_N] for the codes u of K-tile k0: each plane's
    bits are shifted straight to the top of the mantissa under the exponent of 1.0 (0x3F800000), so a
    code costs a shift and a mask-or per plane, and no conversion or subtraction at all."""
    bits = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N) << (23 - BITS)
    return (bits | ONE).to(tl.float32, bitcast=True)


@triton.jit
def store_output(out_ptr, bias_ptr, acc, offs_m, offs_n, mask, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED = type(load_codes).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


def dot_type(dtype: torch.dtype):
    """The ``tl.dot`` operand type and input precision for activations of ``dtype``."""
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16:
        return (tl.float32 if INTERPRETED else tl.bfloat16), "tf32"
    if dtype == torch.float32:
        return tl.float32, "ieee"
    raise TypeError(f"activations must be fp16, bf16 or fp32, got {dtype}")
