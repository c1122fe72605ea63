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
def _load_tens(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The three words a, b, c [BLOCK_K / 32, BLOCK_N] of each 32-code block of K-tile k0 ("tens")."""
    blocks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask = (blocks < rows_per_bit)[:, None] & mask_n[None, :]
    ptrs = w_ptr + (3 * blocks)[:, None] * N + offs_n[None, :]
    a = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    b = tl.load(ptrs + N, mask=mask, other=0, eviction_policy="evict_first")
    c = tl.load(ptrs + 2 * N, mask=mask, other=0, eviction_policy="evict_first")
    return a, b, c


@triton.jit
def load_tens_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unsigned 3-bit codes [BLOCK_K, BLOCK_N] of K-tile k0 from the "tens" layout (``packing.pack_tens``):
    code 10 r + j of a block at bits 3 j of word r; codes 30 and 31 from the words' top bits."""
    a, b, c = _load_tens(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BLOCK_K, BLOCK_N)
    slot = tl.arange(0, 32)[None, :, None]
    word = tl.where(slot < 10, a[:, None, :], tl.where(slot < 20, b[:, None, :], c[:, None, :]))
    u = (word >> (3 * (slot % 10))) & 7
    u30 = ((a >> 30) & 3) | ((b >> 28) & 4)
    u31 = ((b >> 31) & 1) | ((c >> 29) & 6)
    u = tl.where(slot == 30, u30[:, None, :], tl.where(slot == 31, u31[:, None, :], u))
    return tl.reshape(u, (BLOCK_K, BLOCK_N))


@triton.jit
def load_codes(
    w_ptr,
    k0,
    offs_n,
    mask_n,
    rows_per_bit,
    N,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TENS: tl.constexpr,
):
    """Unsigned codes [BLOCK_K, BLOCK_N] (int32) of K-tile k0 from the planes layout of ``packing.py``
    (or, with TENS, the 3-bit "tens" layout)."""
    if TENS:
        return load_tens_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BLOCK_K, BLOCK_N)
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
    bits = load_codes(w_ptr, k0, offs_n, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N, False) << (23 - BITS)
    return (bits | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _x_scaled(x_ptr, k, offs_m, mask_m, K, stride_xm, stride_xk, EXPONENT: tl.constexpr, EVEN_K: tl.constexpr):
    """(x[:, k] * 2**EXPONENT, x[:, k]) in fp32 ([BLOCK_M, 1] each), 0 past K. With EVEN_K (every
    K-tile full) one row is loaded with no mask at all (the launcher never runs an empty x), which
    saves the compare, the increment and the zeroing of the predicated load per k."""
    ptrs = x_ptr + offs_m[:, None] * stride_xm + k * stride_xk
    if EVEN_K and offs_m.shape[0] == 1:
        x = tl.load(ptrs).to(tl.float32)
    elif EVEN_K:
        x = tl.load(ptrs, mask=mask_m[:, None], other=0.0).to(tl.float32)
    else:
        x = tl.load(ptrs, mask=mask_m[:, None] & (offs_m[:, None] * 0 + k < K), other=0.0).to(tl.float32)
    return x * (2.0**EXPONENT), x


@triton.jit
def _field(
    acc,
    x_sum,
    word,
    x_ptr,
    k,
    offs_m,
    mask_m,
    K,
    stride_xm,
    stride_xk,
    POS: tl.constexpr,
    MASK: tl.constexpr,
    C: tl.constexpr,
    COEF: tl.constexpr,
    SUM: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc += COEF x[:, k] * f for the field f = word & (MASK << POS) (POS + width <= 23)."""
    xs, x = _x_scaled(x_ptr, k, offs_m, mask_m, K, stride_xm, stride_xk, 149 - POS - C + COEF, EVEN_K)
    acc += xs * (word & (MASK << POS)).to(tl.float32, bitcast=True)
    if SUM:
        x_sum += x
    return acc, x_sum


@triton.jit
def _ten_fields(
    acc, x_sum, word, x_ptr, k, offs_m, mask_m, K, stride_xm, stride_xk, C: tl.constexpr, EVEN_K: tl.constexpr
):
    """The ten codes at bits 3 j of one word (codes k .. k + 9): j < 7 as they are, j >= 7 after >> 9."""
    high = word >> 9
    for j in tl.static_range(7):
        acc, x_sum = _field(
            acc, x_sum, word, x_ptr, k + j, offs_m, mask_m, K, stride_xm, stride_xk, 3 * j, 7, C, 0, True, EVEN_K
        )
    for j in tl.static_range(7, 10):
        acc, x_sum = _field(
            acc, x_sum, high, x_ptr, k + j, offs_m, mask_m, K, stride_xm, stride_xk, 3 * j - 9, 7, C, 0, True, EVEN_K
        )
    return acc, x_sum, high


@triton.jit
def _code_words(w_ptr, row, offs_n, mask_n, limit, N, EVEN_K: tl.constexpr):
    """Word row ``row`` [1, BLOCK_N] of the codes (rows from ``limit`` on read as 0, unless EVEN_K)."""
    if EVEN_K:
        mask = mask_n[None, :]
    else:
        mask = (mask_n & (offs_n * 0 + row < limit))[None, :]
    return tl.load(w_ptr + row * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def tens_products(
    acc,
    x_sum,
    x_ptr,
    w_ptr,
    k0,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    rows_per_bit,
    K,
    N,
    stride_xm,
    stride_xk,
    C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """(acc + 2**-C sum_k x u [BLOCK_M, BLOCK_N], x_sum + sum_k x [BLOCK_M, 1]) over K-tile k0 of 3-bit
    codes in the "tens" layout, at one AND and one FMA per field (34 fields per 32 codes) and one shift
    per word; the caller scales the sum back by 2**C once per group: C = 40 for fp16 activations (every
    fp16 x is in range); 64 for bf16 / fp32, whose x must stay under 2**41 in magnitude (products
    |x u| < 2**-62 lose precision as denormals).

    A field of bits at ``pos`` inside bits 0..22, masked out of its word, read as fp32 is the denormal
    number ``f * 2**(pos - 149)``: exact, linear in the code, no conversion and no implicit 1. The
    fields at bits 21..31 are read from the word shifted right by 9 (the sign bits it shifts in are
    masked off). Each x is scaled once by ``2**(149 - pos - C)`` (times 4 or 2 for the high parts of
    codes 30 and 31), so every product is ``x * u * 2**-C``, a normal number (all exact powers of
    two). EVEN_K: K is a multiple of the program's K-tiles (no masks on x and the words)."""
    for block in tl.static_range(BLOCK_K // 32):
        k = k0 + 32 * block
        row = k // 32
        a = _code_words(w_ptr, 3 * row, offs_n, mask_n, 3 * rows_per_bit, N, EVEN_K)
        b = _code_words(w_ptr, 3 * row + 1, offs_n, mask_n, 3 * rows_per_bit, N, EVEN_K)
        c = _code_words(w_ptr, 3 * row + 2, offs_n, mask_n, 3 * rows_per_bit, N, EVEN_K)
        acc, x_sum, a_high = _ten_fields(acc, x_sum, a, x_ptr, k, offs_m, mask_m, K, stride_xm, stride_xk, C, EVEN_K)
        acc, x_sum, b_high = _ten_fields(
            acc, x_sum, b, x_ptr, k + 10, offs_m, mask_m, K, stride_xm, stride_xk, C, EVEN_K
        )
        acc, x_sum, c_high = _ten_fields(
            acc, x_sum, c, x_ptr, k + 20, offs_m, mask_m, K, stride_xm, stride_xk, C, EVEN_K
        )
        # code 30 = a[30:32] + 4 b[30], code 31 = b[31] + 2 c[30:32] (bits 21, 22 of the shifted words)
        acc, x_sum = _field(
            acc, x_sum, a_high, x_ptr, k + 30, offs_m, mask_m, K, stride_xm, stride_xk, 21, 3, C, 0, True, EVEN_K
        )
        acc, x_sum = _field(
            acc, x_sum, b_high, x_ptr, k + 30, offs_m, mask_m, K, stride_xm, stride_xk, 21, 1, C, 2, False, EVEN_K
        )
        acc, x_sum = _field(
            acc, x_sum, b_high, x_ptr, k + 31, offs_m, mask_m, K, stride_xm, stride_xk, 22, 1, C, 0, True, EVEN_K
        )
        acc, x_sum = _field(
            acc, x_sum, c_high, x_ptr, k + 31, offs_m, mask_m, K, stride_xm, stride_xk, 21, 3, C, 1, False, EVEN_K
        )
    return acc, x_sum


@triton.jit
def plane_products(
    acc,
    x_sum,
    x_ptr,
    w_ptr,
    k0,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    rows_per_bit,
    K,
    N,
    stride_xm,
    stride_xk,
    C: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``tens_products`` for 2-, 4- and 8-bit codes in the planes layout (one plane: 32 / BITS codes
    per word at bits BITS j): the fields inside bits 0..22 are read as they are, the others from the
    word shifted right by 12 (4-bit), 10 (2-bit) or 16 (8-bit); one AND and one FMA per code."""
    PER_WORD: tl.constexpr = 32 // BITS
    DIRECT: tl.constexpr = 23 // BITS  # fields j < DIRECT end inside bit 22
    if BITS == 4:
        SHIFT: tl.constexpr = 12
    elif BITS == 2:
        SHIFT: tl.constexpr = 10
    else:
        SHIFT: tl.constexpr = 16
    MASK: tl.constexpr = (1 << BITS) - 1
    for word in tl.static_range(BLOCK_K // PER_WORD):
        k = k0 + word * PER_WORD
        w = _code_words(w_ptr, k // PER_WORD, offs_n, mask_n, rows_per_bit * BITS, N, EVEN_K)
        high = w >> SHIFT
        for j in tl.static_range(DIRECT):
            acc, x_sum = _field(
                acc, x_sum, w, x_ptr, k + j, offs_m, mask_m, K, stride_xm, stride_xk, BITS * j, MASK, C, 0, True, EVEN_K
            )
        for j in tl.static_range(DIRECT, PER_WORD):
            acc, x_sum = _field(
                acc,
                x_sum,
                high,
                x_ptr,
                k + j,
                offs_m,
                mask_m,
                K,
                stride_xm,
                stride_xk,
                BITS * j - SHIFT,
                MASK,
                C,
                0,
                True,
                EVEN_K,
            )
    return acc, x_sum


@triton.jit
def codebook_products(
    x_ptr,
    w_ptr,
    table_ptr,
    k0,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    rows_per_bit,
    K,
    N,
    stride_xm,
    stride_xk,
    BITS: tl.constexpr,
    LOG_NP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """sum_k x[:, k] lut[n, u[k, n]] [BLOCK_M, BLOCK_N] over K-tile k0, for codebook weights whose codes
    are one power-of-two plane (2, 4 or 8 bits) and whose codebooks are laid out code-major, fp32
    ``table[code, n]`` [2**BITS, 2**LOG_NP] (``packing.codebook_table``).

    A code masked in place out of its word, ``u * 2**p`` (p its bit position; the upper half of the
    word is shifted down by 16 once), times the constant ``2**(LOG_NP - p)`` is its row's offset in the
    table, so a weight costs one LOP3, one multiply-add into the column's 64-bit address (IMAD.WIDE),
    one L1-resident load and one FMA; the table's rows are a power of two >= N long, and at least
    2**p, so that constant is an integer. A warp's lanes read adjacent columns of one code row each.
    x is loaded once per code and row and reused by a thread's columns."""
    PER_WORD: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER_WORD // 2
    columns = table_ptr + tl.minimum(offs_n, N - 1)[None, :]  # columns past N read column N - 1, never stored
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for word in tl.static_range(BLOCK_K // PER_WORD):
        k = k0 + word * PER_WORD
        row = k // PER_WORD
        w = tl.load(
            w_ptr + row * N + offs_n[None, :],
            mask=(mask_n & (offs_n * 0 + row < rows_per_bit * BITS))[None, :],
            other=0,
            eviction_policy="evict_first",
        )
        for j in tl.static_range(PER_WORD):
            if j < HALF:
                field = w & (((1 << BITS) - 1) << (BITS * j))
            else:
                field = (w >> 16) & (((1 << BITS) - 1) << (BITS * (j - HALF)))
            entry = tl.load(columns + field * (1 << (LOG_NP - BITS * (j % HALF))))
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (k + j) * stride_xk,
                mask=mask_m[:, None] & (offs_m[:, None] * 0 + k + j < K),
                other=0.0,
                eviction_policy="evict_last",
            ).to(tl.float32)
            acc += x * entry
    return acc


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
