"""Bit packing for the kernels (pure torch).

Kernel layout ("planes", packed along K, stored K-major)
--------------------------------------------------------
A ``bits``-wide unsigned code is split into power-of-two planes, one per set bit of ``bits``,
high plane first: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, and 2, 4, 8 are a single plane. The
plane of width ``p`` holds bits ``[bits & (p-1), bits & (p-1) + p)`` of every code (the bits of
the narrower planes sit below it). Each plane is packed along K, ``32 // p`` codes per int32 word,
code ``k`` at bit ``(k % (32 // p)) * p`` of word ``k // (32 // p)``, LSB first, and stored
K-major: ``plane[word, n]`` with N contiguous, so a warp reading consecutive ``n`` of one word is
coalesced (the layout of GPTQ, SqueezeLLM's ``qweight`` and gemlite's ``W_q``). The planes are
stacked into one int32 tensor ``[K_pad * bits / 32, N]`` (``K_pad`` = K rounded up to 32), so
the kernel reads exactly ``bits / 8`` bytes per weight with no padding bits, and every plane uses
the cheap power-of-two shift-and-mask unpack. This is gemlite's experimental 3-bit scheme
(``A16W3_gemm.py``: a 1-bit and a 2-bit plane) generalised to every width; for 2, 4 and 8 bits it
is the plain pow2 layout and coincides bit-for-bit with compressed-tensors' packing, transposed.

Metadata is kernel-side ``[G, N]`` (N contiguous): scales in their own dtype and, for asymmetric
weights, ``zs = -z * s`` in fp32 so the dequantization is one FMA, ``w = u * s + zs`` (gemlite's
``W_group_mode == 4``). ``zs`` is fp32 rather than fp16 so the kernels agree with the reference
``(u - z) * s`` to fp32 rounding; it costs 16 extra bits per group (0.125 bit/weight at group 128).

compressed-tensors ``pack-quantized`` (>= 0.17, "dense" layout: signed ``q = u - 2**(bits-1)``
packed densely along K in ``[N, ceil(K*bits/32)]``, scales ``[N, G]``, signed zero points packed
along N) is decoded by ``compressor.export.compressed_tensors`` with compressed-tensors' own
``unpack_from_int32`` and re-packed with ``pack_uniform`` (``repack_compressed_tensors`` there):
exact, once at load time.
The dense layout itself is not a kernel layout: its codes straddle words for 3/5/6/7 bits.

Kernel layout of 3-bit codes ("tens"), built at load time from any checkpoint layout
------------------------------------------------------------------------------------
3-bit weights are re-packed for the kernels (``KERNEL_LAYOUTS``; exported checkpoints keep the planes
or compressed-tensors' layout): each block of 32 codes along K is three int32 words ``a, b, c``, stored
at rows ``3 * block + (0, 1, 2)`` of ``[K_pad * 3 / 32, N]`` (N contiguous, as the planes; exactly 3
bits per weight). Word ``r`` holds codes ``10 r + j`` at bits ``3 j`` (j = 0..9, bits 0..29); the two
codes left over take the words' top bits: code 30 = ``a[30:32] | b[30] << 2``, code 31 =
``b[31] | c[30:32] << 1``. Why: a field inside bits 0..22 of a word, masked with one AND, *is* an fp32
number (a denormal, ``u * 2**(pos - 149)``) with no shift and no int->float conversion, and one shift
by 9 brings the fields at bits 21..31 into that range; so the decode kernel spends one AND and one
FMA per code and one shift per word (``decode._tens_rows``) -- the planes layout of 3-bit codes
needs a shift and a mask-or for each of two planes per code. Codes 30 and 31 are each two fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor.weights.values import (
    BFP_EXPONENT_BIAS,
    BFPWeight,
    DenseAndSparseWeight,
    LUTWeight,
    SparseOutliers,
    UniformWeight,
)

WORD_BITS = 32


def plane_widths(bits: int) -> list[int]:
    """The power-of-two planes a ``bits``-wide code is split into, high plane first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return [width for width in (8, 4, 2, 1) if bits & width]


def padded_k(in_features: int) -> int:
    """K rounded up to a whole number of 32-code blocks (every plane then ends on a word)."""
    return math.ceil(in_features / WORD_BITS) * WORD_BITS


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 2**bits) -> int32 planes [K_pad * bits / 32, N] (see module doc)."""
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    kp = padded_k(k)
    values = torch.zeros(kp, n, dtype=torch.int64, device=codes.device)
    values[:k] = codes.t().to(torch.int64)
    planes = []
    for width in plane_widths(bits):
        per_word = WORD_BITS // width
        part = (values >> (bits & (width - 1))) & ((1 << width) - 1)
        shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
        planes.append((part.view(kp // per_word, per_word, n) << shifts[None, :, None]).sum(1))
    return _to_int32_words(torch.cat(planes)).contiguous()


def pack_tens(codes: torch.Tensor) -> torch.Tensor:
    """uint8 3-bit codes [N, K] -> int32 "tens" words [K_pad * 3 / 32, N] (see module doc)."""
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 8:
        raise ValueError(f"codes exceed 3 bits (max {int(codes.max())})")
    kp = padded_k(k)
    u = torch.zeros(kp // WORD_BITS, WORD_BITS, n, dtype=torch.int64, device=codes.device)
    u.view(kp, n)[:k] = codes.t().to(torch.int64)
    shifts = torch.arange(10, device=codes.device, dtype=torch.int64)[None, :, None] * 3
    words = [(u[:, 10 * r : 10 * r + 10] << shifts).sum(1) for r in range(3)]
    words[0] |= (u[:, 30] & 3) << 30
    words[1] |= ((u[:, 30] >> 2) << 30) | ((u[:, 31] & 1) << 31)
    words[2] |= (u[:, 31] >> 1) << 30
    return _to_int32_words(torch.stack(words, 1).reshape(-1, n)).contiguous()


def unpack_tens(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``pack_tens``: int32 words -> uint8 codes [N, K]."""
    n, k = shape
    kp = padded_k(k)
    if tuple(packed.shape) != (kp * 3 // WORD_BITS, n):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold 3-bit codes of shape {shape}")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(kp // WORD_BITS, 3, n)
    shifts = torch.arange(10, device=packed.device, dtype=torch.int64)[None, None, :, None] * 3
    u = ((words[:, :, None, :] >> shifts) & 7).reshape(-1, 30, n)
    a, b, c = words.unbind(1)
    code30 = ((a >> 30) & 3) | (((b >> 30) & 1) << 2)
    code31 = ((b >> 31) & 1) | (((c >> 30) & 3) << 1)
    u = torch.cat([u, code30[:, None], code31[:, None]], 1).reshape(kp, n)
    return u[:k].t().to(torch.uint8).contiguous()


LAYOUTS = ("planes", "tens")


def kernel_layout(bits: int) -> str:
    """The codes' layout on the kernel side: "tens" for 3-bit uniform codes, else the planes."""
    return "tens" if bits == 3 else "planes"


def pack_kernel_codes(codes: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    return pack_tens(codes) if layout == "tens" else pack_codes(codes, bits)


def unpack_kernel_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int], layout: str) -> torch.Tensor:
    """The codes [N, K] of kernel-side words in ``layout`` ("planes" or "tens")."""
    if layout == "tens":
        if bits != 3:
            raise ValueError(f"the tens layout holds 3-bit codes, not {bits}-bit")
        return unpack_tens(packed, shape)
    return unpack_codes(packed, bits, shape)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 planes -> uint8 codes [N, K]."""
    n, k = shape
    kp = padded_k(k)
    if tuple(packed.shape) != (kp * bits // WORD_BITS, n):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold {bits}-bit codes of shape {shape}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    values = torch.zeros(kp, n, dtype=torch.int64, device=packed.device)
    start = 0
    for width in plane_widths(bits):
        per_word = WORD_BITS // width
        rows = kp // per_word
        shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * width
        part = (words[start : start + rows, None, :] >> shifts[None, :, None]) & ((1 << width) - 1)
        values |= part.reshape(kp, n) << (bits & (width - 1))
        start += rows
    return values[:k].t().to(torch.uint8).contiguous()


# --------------------------------------------------------------------------------------------
# Kernel-side tensors of each weight kind (prepared once per layer; see dispatch.prepare)


@dataclass
class PackedUniform:
    packed: torch.Tensor  # int32 [K_pad * bits / 32, N]
    scales: torch.Tensor  # [G, N], the scales' dtype
    zs: torch.Tensor | None  # fp32 [G, N] = -z * s; None when symmetric (z = 2**(bits-1))
    bits: int
    group_size: int
    shape: tuple[int, int]
    layout: str = "planes"  # or "tens" (3-bit codes, see module doc)

    @property
    def rows_per_bit(self) -> int:
        """int32 rows of one 1-bit plane (a plane of width p has p times as many); tens: blocks of 32 codes."""
        return padded_k(self.shape[1]) // WORD_BITS

    def nbytes(self) -> int:
        """Bytes a kernel must read for the weight (codes + metadata)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zs) if t is not None)


@dataclass
class PackedLUT:
    packed: torch.Tensor  # int32 [K_pad * bits / 32, N]
    lut: torch.Tensor  # [N, 2**bits], contiguous rows
    bits: int
    shape: tuple[int, int]
    table: torch.Tensor | None = None  # 2/4/8 bits: fp32 [2**bits, 2**log_np] code-major (``codebook_table``)

    @property
    def log_np(self) -> int:
        """log2 of the code-major table's row length (a power of two >= N), 0 without one."""
        return 0 if self.table is None else self.table.shape[1].bit_length() - 1

    @property
    def rows_per_bit(self) -> int:
        return padded_k(self.shape[1]) // WORD_BITS

    def nbytes(self) -> int:
        """Bytes a kernel reads: codes + one codebook copy (the code-major table replaces ``lut`` there)."""
        return self.packed.numel() * 4 + self.lut.numel() * self.lut.element_size()


@dataclass
class PackedOutliers:
    """Outliers as COO (one row index per entry), so a kernel can split them evenly by entries."""

    rows: torch.Tensor  # int32 [nnz], sorted
    cols: torch.Tensor  # int32 [nnz]
    vals: torch.Tensor  # float [nnz]
    shape: tuple[int, int]
    crow: torch.Tensor | None = None  # int32 [N + 1]: row n's entries are [crow[n], crow[n + 1])

    @property
    def nnz(self) -> int:
        return self.vals.numel()

    def nbytes(self) -> int:
        return self.nnz * (8 + self.vals.element_size())


def pack_uniform(weight: UniformWeight) -> PackedUniform:
    n, k = weight.shape
    scales = weight.scales.t().contiguous()
    zs = None
    if weight.zeros is not None:
        zs = (-(weight.zeros.float() * weight.scales.float())).t().contiguous()
    layout = kernel_layout(weight.bits)
    packed = pack_kernel_codes(weight.codes, weight.bits, layout)
    return PackedUniform(packed, scales, zs, weight.bits, weight.group_size, (n, k), layout)


def codebook_table(lut: torch.Tensor) -> torch.Tensor:
    """Per-row codebooks [N, E] -> the code-major fp32 table [E, NP] that the decode kernel indexes
    (``codes.codebook_products``): NP is N rounded up to a power of two, and at least 2**p for the
    highest bit position p of a code in a half word (4-bit: 4096), zero columns past N."""
    n, entries = lut.shape
    bits = entries.bit_length() - 1
    row = max(1 << max(0, (n - 1).bit_length()), 1 << (bits * (16 // bits - 1)))  # >= N and >= 2**(top code's bit)
    table = torch.zeros(entries, row, dtype=torch.float32, device=lut.device)
    table[:, :n] = lut.t().float()
    return table


def pack_lut(weight: LUTWeight) -> PackedLUT:
    if weight.lut.shape != (weight.shape[0], 2**weight.bits):
        raise ValueError(f"lut shape {tuple(weight.lut.shape)} != (N, 2**bits) = {(weight.shape[0], 2**weight.bits)}")
    table = codebook_table(weight.lut) if weight.bits in (2, 4, 8) else None
    return PackedLUT(pack_codes(weight.codes, weight.bits), weight.lut.contiguous(), weight.bits, weight.shape, table)


def pack_outliers(outliers: SparseOutliers) -> PackedOutliers:
    crow = outliers.crow.long()
    rows = torch.repeat_interleave(torch.arange(outliers.shape[0], device=crow.device), crow[1:] - crow[:-1])
    return PackedOutliers(
        rows.to(torch.int32),
        outliers.col.to(torch.int32).contiguous(),
        outliers.val.contiguous(),
        outliers.shape,
        crow.to(torch.int32).contiguous(),
    )


def pack_bfp(weight: BFPWeight) -> PackedUniform:
    """BFP weights are symmetric uniform weights whose group scale is a power of two:
    ``w = (u - 2**(m-1)) * 2**(e - 127 - (m - 2))`` with groups of ``block_size`` input columns. The
    kernel layout is therefore the uniform one (mantissas as ``m``-bit codes in planes, the fp32 power
    of two of each exponent byte as the group scale, exact), and the uniform Triton kernels run it.
    Reading fp32 scales costs 32 / block_size bits per weight of traffic where the exponent byte is 8."""
    n, k = weight.shape
    shift = weight.exponents.to(torch.int32) - BFP_EXPONENT_BIAS - (weight.mantissa_bits - 2)
    half = torch.div(shift, 2, rounding_mode="floor")  # 2**shift in two halves: exact down to the subnormals
    scales = torch.ldexp(torch.ldexp(torch.ones_like(shift, dtype=torch.float32), half.float()), (shift - half).float())
    return PackedUniform(
        pack_codes(weight.mantissas, weight.mantissa_bits),
        scales.t().contiguous(),
        None,
        weight.mantissa_bits,
        weight.block_size,
        (n, k),
    )


def pack_dense_and_sparse(weight: DenseAndSparseWeight) -> tuple[PackedUniform | PackedLUT, PackedOutliers]:
    dense, _ = pack_weight(weight.base)
    return dense, pack_outliers(weight.outliers)


# The kernel table: weight kind -> its kernel tensors (dense part, sparse part). A kind not listed has
# no kernel and runs the torch reference on every backend (dispatch.py).
KERNEL_LAYOUTS = {
    "uniform": lambda weight: (pack_uniform(weight), None),
    "lut": lambda weight: (pack_lut(weight), None),
    "sparse": lambda weight: (None, pack_outliers(weight)),
    "dense_and_sparse": pack_dense_and_sparse,
    "bfp": lambda weight: (pack_bfp(weight), None),
}


def pack_weight(weight) -> tuple[PackedUniform | PackedLUT | None, PackedOutliers | None]:
    """Any value type with a kernel layout -> (dense part, sparse part), either possibly None."""
    if weight.kind not in KERNEL_LAYOUTS:
        raise TypeError(f"no kernel layout for {type(weight).__name__}")
    return KERNEL_LAYOUTS[weight.kind](weight)
