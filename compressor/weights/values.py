"""Quantized weight value types: what a quantizer produces and what kernels and exporters consume.

Every value type is a small dataclass of tensors (marked with ``tensor_field``) plus static metadata.
It knows its shape, its exact storage cost in bits per weight, its torch reference
dequantization, and how to take a slice of its output rows (``rows``). The bit layout for kernels lives in
``compressor.kernels`` and the checkpoint layout in ``compressor.export``; nothing else needs to know either.

Conventions (shared with the kernels and the compressed-tensors exporter):

* codes are **unsigned** integers ``u`` in ``[0, 2**bits)``, kept unpacked (uint8) in memory;
* uniform dequantization is ``w = (u - z) * s`` per group of ``group_size`` consecutive input
  columns; ``group_size == -1`` means one group per output row (per-channel);
* symmetric weights store no zero tensor: their zero point is the constant ``2**(bits - 1)``
  (the same offset compressed-tensors uses when it stores signed ints as unsigned).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

SCALE_BITS = 16  # scales (and float metadata) are stored in fp16/bf16 in every checkpoint we write


def tensor_field(optional: bool = False):
    """A dataclass field that holds a tensor (moved with the module, saved in checkpoints)."""
    return field(default=None if optional else dataclasses.MISSING, metadata={"tensor": True})


def tensor_names(value) -> list[str]:
    return [f.name for f in dataclasses.fields(value) if f.metadata.get("tensor")]


def static_fields(value) -> dict:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if not f.metadata.get("tensor")}


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[N, G] -> [N, K]: repeat each group's value over its columns (the last group may be short)."""
    if group_size == -1:
        return per_group.expand(-1, in_features)
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


CHUNK_ELEMENTS = 2**22  # rows are processed in chunks of ~4M weights: fp32 temporaries stay ~16 MB each


def row_chunks(rows: int, columns: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(columns, 1))
    if step >= 128:  # whole 128-row blocks (FP8 block scales)
        step -= step % 128
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


@dataclass
class UniformWeight:
    """Uniform (affine) integer weights with group-wise scales and optional zero points."""

    codes: torch.Tensor = tensor_field()  # uint8 [N, K], values in [0, 2**bits)
    scales: torch.Tensor = tensor_field()  # float [N, G]
    zeros: torch.Tensor | None = tensor_field(optional=True)  # int32 [N, G], unsigned domain; None = symmetric
    bits: int = 4
    group_size: int = 128  # -1: per output channel

    kind = "uniform"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def zero_points(self) -> torch.Tensor:
        """[N, G] zero points in the unsigned code domain (the constant mid-point when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.int32)

    def rows(self, rows: slice) -> UniformWeight:
        """The output rows ``rows`` (a contiguous slice), as views of the same tensors."""
        zeros = None if self.zeros is None else self.zeros[rows]
        return UniformWeight(self.codes[rows], self.scales[rows], zeros, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reference dequantization in fp32, cast to ``dtype`` (default: the scales' dtype)."""
        n, k = self.shape
        scale = expand_groups(self.scales.float(), k, self.group_size)
        zero = expand_groups(self.zero_points().float(), k, self.group_size)
        weight = (self.codes.float() - zero) * scale
        return weight.to(dtype or self.scales.dtype)

    def bits_per_weight(self) -> float:
        """Storage cost as exported: codes, fp16 scales, and zero points packed at ``bits`` each."""
        n, k = self.shape
        groups = num_groups(k, self.group_size)
        metadata = groups * n * (SCALE_BITS + (0 if self.symmetric else self.bits))
        return self.bits + metadata / (n * k)


@dataclass
class LUTWeight:
    """Non-uniform weights: every output row has its own codebook of ``2**bits`` values (SqueezeLLM).

    ``w[n, k] = lut[n, codes[n, k]]``. The codebook is stored as fp16 in checkpoints (``SCALE_BITS``).
    """

    codes: torch.Tensor = tensor_field()  # uint8 [N, K], values in [0, 2**bits)
    lut: torch.Tensor = tensor_field()  # float [N, 2**bits]
    bits: int = 4

    kind = "lut"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, rows: slice) -> LUTWeight:
        """The output rows ``rows`` (a contiguous slice), as views of the same tensors."""
        return LUTWeight(self.codes[rows], self.lut[rows], self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reference dequantization (a gather from each row's codebook), cast to ``dtype``."""
        weight = self.lut.float().gather(1, self.codes.long())
        return weight.to(dtype or self.lut.dtype)

    def bits_per_weight(self) -> float:
        n, k = self.shape
        return self.bits + SCALE_BITS * 2**self.bits / k


def _outlier_bits_per_weight(nnz: int, shape: tuple[int, int]) -> float:
    """CSR cost as exported: a fp16 value and an int32 column per entry, plus int32 row pointers."""
    n, k = shape
    return (nnz * (SCALE_BITS + 32) + 32 * (n + 1)) / (n * k)


def _csr_to_dense(crow, col, val, shape, dtype) -> torch.Tensor:
    n, k = shape
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:].long() - crow[:-1].long())
    dense = torch.zeros(n, k, dtype=torch.float32, device=val.device)
    dense.index_put_((rows, col.long()), val.float(), accumulate=True)
    return dense.to(dtype)


@dataclass
class SparseOutliers:
    """Full-precision outliers as a CSR matrix by output row (the sparse half of dense-and-sparse).

    On its own it is a weight whose other entries are zero; attached to a uniform or LUT weight
    (``DenseAndSparseWeight``) it is added to it: ``W = base + S``.
    """

    crow: torch.Tensor = tensor_field()  # int32 [N + 1], row pointers
    col: torch.Tensor = tensor_field()  # int32 [nnz], column of each entry
    val: torch.Tensor = tensor_field()  # float [nnz]
    shape: tuple[int, int] = (0, 0)

    kind = "sparse"

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        if self.crow.numel() != self.shape[0] + 1:
            raise ValueError(f"crow has {self.crow.numel()} entries; a {self.shape} matrix needs {self.shape[0] + 1}")

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @classmethod
    def from_dense(
        cls, matrix: torch.Tensor, dtype: torch.dtype | None = None, mask: torch.Tensor | None = None
    ) -> SparseOutliers:
        """CSR of the nonzero entries of a dense [N, K] matrix (values cast to ``dtype``), or of the
        entries where ``mask`` is True (zeros included)."""
        rows, cols = (matrix != 0 if mask is None else mask).nonzero(as_tuple=True)  # row-major order, as CSR needs
        counts = torch.bincount(rows, minlength=matrix.shape[0])
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(
            crow=crow.to(torch.int32),
            col=cols.to(torch.int32),
            val=matrix[rows, cols].to(dtype or matrix.dtype),
            shape=tuple(matrix.shape),
        )

    def rows(self, rows: slice) -> SparseOutliers:
        """The output rows ``rows`` (a contiguous slice): their entries, with row pointers from 0."""
        start, stop, _ = rows.indices(self.shape[0])
        first, end = int(self.crow[start]), int(self.crow[stop])
        crow = self.crow[start : stop + 1] - first if first else self.crow[start : stop + 1]
        return SparseOutliers(crow, self.col[first:end], self.val[first:end], (stop - start, self.shape[1]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense [N, K] matrix with the outliers in place and zeros elsewhere."""
        return _csr_to_dense(self.crow, self.col, self.val, self.shape, dtype or self.val.dtype)

    def bits_per_weight(self) -> float:
        return _outlier_bits_per_weight(self.nnz, self.shape)


@dataclass
class DenseAndSparseWeight:
    """A uniform or LUT weight plus sparse full-precision outliers: ``W = base + S`` (SqueezeLLM).

    The fields are flat (the base's tensors, then the outliers' as ``outlier_*``) because
    ``QuantizedLinear`` registers every ``tensor_field`` of a value as a buffer: a nested value
    would end up among the static fields and would not follow ``.to(device)`` or ``state_dict``.
    Build one with ``DenseAndSparseWeight.from_parts(base, outliers)``; ``.base`` and ``.outliers``
    give the two halves back as their own value types (views of the same tensors). Exactly one of
    ``scales`` (uniform base) and ``lut`` (LUT base) is set.
    """

    codes: torch.Tensor = tensor_field()  # uint8 [N, K]
    outlier_crow: torch.Tensor = tensor_field()  # int32 [N + 1]
    outlier_col: torch.Tensor = tensor_field()  # int32 [nnz]
    outlier_val: torch.Tensor = tensor_field()  # float [nnz]
    scales: torch.Tensor | None = tensor_field(optional=True)  # uniform base: float [N, G]
    zeros: torch.Tensor | None = tensor_field(optional=True)  # uniform base, asymmetric: int32 [N, G]
    lut: torch.Tensor | None = tensor_field(optional=True)  # LUT base: float [N, 2**bits]
    bits: int = 4
    group_size: int = 128  # uniform base only

    kind = "dense_and_sparse"

    def __post_init__(self):
        if (self.scales is None) == (self.lut is None):
            raise ValueError("DenseAndSparseWeight needs exactly one of scales (uniform base) or lut (LUT base)")

    @classmethod
    def from_parts(cls, base, outliers: SparseOutliers) -> DenseAndSparseWeight:
        if not isinstance(base, (UniformWeight, LUTWeight)):
            raise TypeError(f"outliers attach to a uniform or LUT weight, not {type(base).__name__}")
        if tuple(base.shape) != tuple(outliers.shape):
            raise ValueError(f"base shape {tuple(base.shape)} != outliers shape {tuple(outliers.shape)}")
        tensors = dict(codes=base.codes, outlier_crow=outliers.crow, outlier_col=outliers.col, outlier_val=outliers.val)
        if isinstance(base, UniformWeight):
            return cls(**tensors, scales=base.scales, zeros=base.zeros, bits=base.bits, group_size=base.group_size)
        return cls(**tensors, lut=base.lut, bits=base.bits)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def base_kind(self) -> str:
        return "lut" if self.lut is not None else "uniform"

    @property
    def base(self):
        if self.lut is not None:
            return LUTWeight(codes=self.codes, lut=self.lut, bits=self.bits)
        return UniformWeight(
            codes=self.codes, scales=self.scales, zeros=self.zeros, bits=self.bits, group_size=self.group_size
        )

    @property
    def outliers(self) -> SparseOutliers:
        return SparseOutliers(crow=self.outlier_crow, col=self.outlier_col, val=self.outlier_val, shape=self.shape)

    def rows(self, rows: slice) -> DenseAndSparseWeight:
        """The output rows ``rows`` (a contiguous slice) of both halves."""
        return DenseAndSparseWeight.from_parts(self.base.rows(rows), self.outliers.rows(rows))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        base = self.base
        weight = base.dequantize(torch.float32) + self.outliers.dequantize(torch.float32)
        return weight.to(dtype or (self.lut if self.lut is not None else self.scales).dtype)

    def bits_per_weight(self) -> float:
        return self.base.bits_per_weight() + _outlier_bits_per_weight(self.outlier_col.numel(), self.shape)


# --------------------------------------------------------------------------------------------
# Block floating point (BFP): blocks of ``block_size`` consecutive values share one 8-bit exponent,
# each value keeps an ``m``-bit signed mantissa. The one definition of the number format, used by
# BFP weights (``BFPWeight``) and by the BFP KV cache (``compressor.kvcache``). Spec:
# export/FORMATS.md ("Block floating point"); the rule is microxcaling's MXINT emulation
# (MXINT8 = m 8, block 32) and dmx-compressor's BFP[m|8]:
#
#   E = floor(log2(max|x| over the block)),  step = 2**(E - (m - 2)),
#   M = clamp(round(x / step), -(2**(m-1) - 1), 2**(m-1) - 1),   x_hat = M * step.
#
# Stored as unsigned bytes: exponent e = E + 127 (e = 0 marks an all-zero block; 255 is never
# written), mantissa u = M + 2**(m-1) in [1, 2**m - 1]. Dequantization:
# x_hat = (u - 2**(m-1)) * 2**(e - 127 - (m - 2)).

BFP_MANTISSA_BITS = (4, 5, 6, 7, 8)
BFP_BLOCK_SIZES = (8, 16, 32, 64, 128)
BFP_ROUNDING = ("nearest_even", "nearest_away")
BFP_EXPONENT_BITS = 8
BFP_EXPONENT_BIAS = 127


def bfp_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def _times_power_of_two(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``x * 2**exponent`` exactly (fp32): in two halves, so 2**exponent itself never overflows to inf."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(x, half.float()), (exponent - half).float())


def bfp_encode(
    x: torch.Tensor, mantissa_bits: int, block_size: int, rounding: str = "nearest_even"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``block_size`` along the last dim of ``x`` [..., K] -> (mantissas uint8 [..., K],
    exponents uint8 [..., ceil(K / block_size)]); a short last block is padded with zeros (which never
    change a block's maximum). Computed in fp32; the exponent comes from ``frexp`` (exact)."""
    if mantissa_bits not in BFP_MANTISSA_BITS:
        raise ValueError(f"mantissa_bits {mantissa_bits} is not one of {BFP_MANTISSA_BITS}")
    if rounding not in BFP_ROUNDING:
        raise ValueError(f"rounding {rounding!r} is not one of {BFP_ROUNDING}")
    k = x.shape[-1]
    blocks = bfp_blocks(k, block_size)
    values = x.float()
    if not torch.isfinite(values).all():
        raise ValueError("BFP cannot encode inf or NaN")
    padded = torch.nn.functional.pad(values, (0, blocks * block_size - k)).reshape(*x.shape[:-1], blocks, block_size)
    amax = padded.abs().amax(dim=-1)
    _, exp2 = torch.frexp(amax)  # amax = f * 2**exp2 with f in [0.5, 1): floor(log2 amax) = exp2 - 1
    exponent = (exp2 - 1).clamp(1 - BFP_EXPONENT_BIAS, BFP_EXPONENT_BIAS)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -BFP_EXPONENT_BIAS))
    scaled = _times_power_of_two(padded, (mantissa_bits - 2 - exponent).unsqueeze(-1))  # x / step, exact
    if rounding == "nearest_even":
        rounded = torch.round(scaled)
    else:
        rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    limit = 2 ** (mantissa_bits - 1) - 1
    mantissas = (rounded.clamp(-limit, limit) + 2 ** (mantissa_bits - 1)).reshape(*x.shape[:-1], blocks * block_size)[
        ..., :k
    ]
    return mantissas.to(torch.uint8), (exponent + BFP_EXPONENT_BIAS).to(torch.uint8)


def bfp_decode(
    mantissas: torch.Tensor,
    exponents: torch.Tensor,
    mantissa_bits: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``bfp_encode``: (u - 2**(m-1)) * 2**(e - 127 - (m - 2)), in fp32, cast to ``dtype``."""
    k = mantissas.shape[-1]
    signed = mantissas.float() - 2 ** (mantissa_bits - 1)
    shift = exponents.to(torch.int32) - BFP_EXPONENT_BIAS - (mantissa_bits - 2)
    shift = shift.repeat_interleave(block_size, dim=-1)[..., :k]
    return _times_power_of_two(signed, shift).to(dtype)


def bfp_quantize(x: torch.Tensor, mantissa_bits: int, block_size: int, rounding: str = "nearest_even") -> torch.Tensor:
    """``x`` through BFP and back (fp32, then ``x``'s dtype): what a BFP store followed by a load gives."""
    return bfp_decode(*bfp_encode(x, mantissa_bits, block_size, rounding), mantissa_bits, block_size, x.dtype)


def bfp_bits_per_value(length: int, mantissa_bits: int, block_size: int) -> float:
    """Storage per value of a BFP vector of ``length`` values: m bits plus its share of the exponents."""
    return mantissa_bits + BFP_EXPONENT_BITS * bfp_blocks(length, block_size) / length


@dataclass
class BFPWeight:
    """Block-floating-point weights: each output row in blocks of ``block_size`` input columns, every
    block one shared 8-bit exponent, every weight an ``mantissa_bits``-bit signed mantissa (stored
    unsigned, ``u = M + 2**(m-1)``). ``w = (u - 2**(m-1)) * 2**(e - 127 - (m - 2))``."""

    mantissas: torch.Tensor = tensor_field()  # uint8 [N, K], values in [1, 2**m)
    exponents: torch.Tensor = tensor_field()  # uint8 [N, ceil(K / block_size)]
    mantissa_bits: int = 8
    block_size: int = 32

    kind = "bfp"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mantissas.shape)

    @property
    def bits(self) -> int:
        return self.mantissa_bits

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, mantissa_bits: int, block_size: int, rounding: str = "nearest_even"
    ) -> BFPWeight:
        """Round an [N, K] weight to BFP (rows in chunks: fp32 temporaries stay small)."""
        parts = [bfp_encode(weight[rows], mantissa_bits, block_size, rounding) for rows in row_chunks(*weight.shape)]
        return cls(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), mantissa_bits, block_size)

    def rows(self, rows: slice) -> BFPWeight:
        return BFPWeight(self.mantissas[rows], self.exponents[rows], self.mantissa_bits, self.block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return bfp_decode(self.mantissas, self.exponents, self.mantissa_bits, self.block_size, dtype or torch.float32)

    def bits_per_weight(self) -> float:
        return bfp_bits_per_value(self.shape[1], self.mantissa_bits, self.block_size)


# --------------------------------------------------------------------------------------------
# Floating-point number formats: FP8 E4M3 and FP4 E2M1 elements with their scales (FP8 per channel or per
# 128x128 block, NVFP4, MXFP4). The one definition of their rounding, used by float weights
# (``values.FloatWeight``), float activations (``modules/activations.py``) and every quantizer on these grids.
#
# Specifications, and compressed-tensors 0.20 (whose quantize functions the tests compare against):
#
# * **E4M3** (OCP FP8, ``torch.float8_e4m3fn``): max 448, round to nearest even, saturating (values are
#   clamped to +-448 before the cast, as compressed-tensors does). Per-channel or per-block scale
#   ``s = amax / 448`` in the scale dtype (an all-zero group gets the dtype's epsilon).
# * **E2M1** (OCP MX v1.0 section 5.3.3): values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; conversion is
#   round to nearest, ties to even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
#   saturating at 6. A code is the 4-bit ``sign << 3 | magnitude index`` (index into ``E2M1_VALUES``).
# * **NVFP4** (NVIDIA, "Introducing NVFP4", 2025; compressed-tensors ``TENSOR_GROUP``): blocks of 16, each an
#   E4M3 scale, and one fp32 global scale per tensor ``g = 448 * 6 / amax(tensor)``. The stored block scale is
#   ``e4m3(g * amax(block) / 6)``; an element is ``q = e2m1(x / (s / g))`` and comes back as ``q * (s / g)``.
# * **MXFP4** (OCP MX v1.0): blocks of 32 sharing an E8M0 scale ``2**(e - 127)``. The OCP reference picks
#   ``e = floor(log2 amax) - 2`` (2 = emax of E2M1), which saturates a block's top values whenever its max has
#   a mantissa >= 1.5. We follow compressed-tensors (what llm-compressor writes and vLLM reads): ``amax`` is
#   first rounded to a power of two keeping one mantissa bit (up when its mantissa is >= 1.75), so fewer block
#   maxima are clipped; the stored format is the same either way.
#
# ``FloatGrid`` names one of these schemes (``FLOAT_GRIDS``); ``grid_params`` computes its scales from a
# weight, ``round_to_grid`` its codes given the scales, ``decode`` the values back.


E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of codes 0..7
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E4M3_EPS = 0.125  # an all-zero block's E4M3 scale (compressed-tensors' choice)
E4M3_TINY = 2.0**-9  # E4M3's smallest subnormal: the least positive scale a trained NVFP4 block keeps
E8M0_BIAS = 127
MX_ELEMENT_EMAX = 2  # floor(log2(6)): the E2M1 offset of an MX scale


@dataclass(frozen=True)
class FloatGrid:
    """One floating-point weight scheme: element format, scale groups and scale encoding."""

    name: str
    element: str  # "e4m3" or "e2m1"
    group_size: int  # input columns sharing a scale; -1: one per output row
    block_rows: int  # output rows sharing a scale (128 for FP8 blocks, else 1)
    scale: str  # "float" (the scale dtype), "e4m3" (with an fp32 global scale) or "e8m0"

    @property
    def bits(self) -> int:
        return 8 if self.element == "e4m3" else 4

    @property
    def global_scale(self) -> bool:
        return self.scale == "e4m3"

    def scale_bits(self, scale_dtype_bits: int) -> int:
        return scale_dtype_bits if self.scale == "float" else 8

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        columns = 1 if self.group_size == -1 else math.ceil(k / self.group_size)
        return math.ceil(n / self.block_rows), columns


FLOAT_GRIDS = {
    grid.name: grid
    for grid in (
        FloatGrid("fp8", "e4m3", -1, 1, "float"),
        FloatGrid("fp8-block", "e4m3", 128, 128, "float"),
        FloatGrid("nvfp4", "e2m1", 16, 1, "e4m3"),
        FloatGrid("mxfp4", "e2m1", 32, 1, "e8m0"),
    )
}


# ----------------------------------------------------------------------------------------------
# elements


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to E2M1, ties to even, saturating: uint8 codes 0..15."""
    x = x.float()
    magnitude = x.abs().clamp(max=E2M1_MAX).contiguous()
    midpoints = torch.tensor(E2M1_MIDPOINTS, device=x.device)
    down = torch.bucketize(magnitude, midpoints, right=False)  # a tie goes to the lower value
    up = torch.bucketize(magnitude, midpoints, right=True)  # ... or to the upper one
    index = torch.where(down % 2 == 0, down, up)  # the even index (mantissa bit 0) of the two
    return (index | (x < 0).to(index.dtype) << 3).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes -> fp32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def e4m3_codes(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to E4M3 (nearest even, saturating): the uint8 bit patterns."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn).float()


def element_codes(grid: FloatGrid, x: torch.Tensor) -> torch.Tensor:
    return e4m3_codes(x) if grid.element == "e4m3" else e2m1_codes(x)


def element_values(grid: FloatGrid, codes: torch.Tensor) -> torch.Tensor:
    return e4m3_values(codes) if grid.element == "e4m3" else e2m1_values(codes)


# ----------------------------------------------------------------------------------------------
# scales


def expand_scales(effective: torch.Tensor, grid: FloatGrid, n: int, k: int) -> torch.Tensor:
    """Effective scales [ceil(N / rows), G] -> [N, K] (every weight's scale)."""
    rows = effective.repeat_interleave(grid.block_rows, dim=0)[:n]
    if grid.group_size == -1:
        return rows.expand(-1, k)
    return rows.repeat_interleave(grid.group_size, dim=1)[:, :k]


def effective_scales(grid: FloatGrid, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 multiplier of each scale group: the float scale, E4M3 scale / global scale, or 2**(e - 127)."""
    if grid.scale == "e8m0" and scales.is_floating_point():  # exponents being trained (E2E-QP): differentiable
        return torch.exp2(scales.float() - E8M0_BIAS)
    if grid.scale == "e8m0":
        return torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.to(torch.int32) - E8M0_BIAS)
    if grid.scale == "e4m3":
        return scales.float() / global_scale.float()
    return scales.float()


def group_amax(weight: torch.Tensor, grid: FloatGrid) -> torch.Tensor:
    """max |w| of every scale group: [ceil(N / rows), G] (short last groups padded with zeros)."""
    n, k = weight.shape
    rows, columns = grid.scale_shape(n, k)
    width = k if grid.group_size == -1 else grid.group_size
    padded = torch.nn.functional.pad(weight.float().abs(), (0, columns * width - k, 0, rows * grid.block_rows - n))
    return padded.reshape(rows, grid.block_rows, columns, width).amax(dim=(1, 3))


def mx_exponents(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8) of MXFP4 blocks with maximum ``amax`` (compressed-tensors' rule, see above)."""
    bits = amax.float().clamp(min=torch.finfo(torch.float32).tiny).view(torch.int32)
    rounded = ((bits + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)  # keep one mantissa bit, round up
    exponent = torch.floor(torch.log2(rounded)) - MX_ELEMENT_EMAX + E8M0_BIAS
    return exponent.clamp(0, 254).to(torch.uint8)


def nvfp4_global_scale(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: ``448 * 6 / amax`` (1 for an all-zero tensor)."""
    amax = weight.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    scale = torch.nan_to_num(E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.reshape(1)


def scales_from_amax(
    grid: FloatGrid, amax: torch.Tensor, scale_dtype: torch.dtype, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored scales of groups with maximum ``amax``: in ``scale_dtype`` (fp8), E4M3 (NVFP4), E8M0 (MXFP4)."""
    if grid.scale == "e8m0":
        return mx_exponents(amax)
    if grid.scale == "e4m3":
        scale = (global_scale.float() * (amax / E2M1_MAX)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return torch.where(scale.float() == 0, torch.full_like(scale, E4M3_EPS), scale)
    scale = (amax / E4M3_MAX).to(scale_dtype)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)


def grid_params(
    grid: FloatGrid,
    weight: torch.Tensor,
    scale_dtype: torch.dtype,
    clip: torch.Tensor | float = 1.0,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales of ``weight`` [N, K] on ``grid`` (``clip`` shrinks each group's range first), and the
    global scale (NVFP4: ``global_scale`` when given, one shared by fused shards, else the weight's own; None
    otherwise)."""
    if not grid.global_scale:
        global_scale = None
    elif global_scale is None:
        global_scale = nvfp4_global_scale(weight)
    return scales_from_amax(grid, group_amax(weight, grid) * clip, scale_dtype, global_scale), global_scale


def round_to_grid(
    grid: FloatGrid, weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """Codes (uint8 [N, K]) of ``weight`` on the grid given by its stored scales."""
    n, k = weight.shape
    scale = expand_scales(effective_scales(grid, scales, global_scale), grid, n, k)
    return element_codes(grid, weight.float() / scale)


def decode(
    grid: FloatGrid, codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """fp32 [N, K] values of codes on their scales."""
    n, k = codes.shape
    return element_values(grid, codes) * expand_scales(effective_scales(grid, scales, global_scale), grid, n, k)


# ----------------------------------------------------------------------------------------------
# activations: dynamic, per token (the last dim), straight-through rounding

ACTIVATION_FORMATS = ("fp8", "nvfp4", "mxfp4")


def _through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward, the identity's gradient in the backward."""
    return x + (rounded - x).detach()


def fake_quantize_float_tokens(x: torch.Tensor, format: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., C] through a dynamic float quantizer and back (FP4 computed in fp32):

    * ``fp8``: one scale per token ``amax / 448``, elements E4M3 (compressed-tensors' FP8_DYNAMIC);
    * ``mxfp4``: blocks of 32 channels with E8M0 scales (the MXFP4 weight rule), elements E2M1;
    * ``nvfp4``: blocks of 16 with E4M3 scales under a global scale: ``global_scale`` (fp32 [1], calibrated once
      per layer as compressed-tensors' NVFP4 ``input_global_scale``, ``448 * 6 / amax`` over the calibration
      inputs), or without one ``448 * 6 / amax`` taken per token. A block's ``amax / 6`` is taken in ``x``'s
      dtype, as compressed-tensors takes it (vLLM's kernel: fp32; the same for fp32 inputs)."""
    original = x.dtype
    if format == "fp8":  # in x's dtype, as compressed-tensors computes it (the same logits in bf16)
        scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
        scale = torch.where(scale == 0, torch.finfo(original).eps, scale)
        scaled = x / scale
        rounded = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(original)
        return _through(scaled, rounded) * scale
    grid = FLOAT_GRIDS[format]
    channels = x.shape[-1]
    if channels % grid.group_size:
        raise ValueError(f"{format} activations need channels in multiples of {grid.group_size}, not {channels}")
    blocks = x.unflatten(-1, (channels // grid.group_size, grid.group_size))
    amax = blocks.abs().amax(dim=-1)
    if (
        grid.global_scale
    ):  # amax / 6 rounded to x's dtype; times 6 is exact in fp32, and scales_from_amax's / 6 undoes it
        amax = (amax / E2M1_MAX).float() * E2M1_MAX
    amax, blocks = amax.float(), blocks.float()
    if not grid.global_scale:
        global_scale = None
    elif global_scale is not None:
        global_scale = global_scale.float().to(x.device)
    else:
        token_amax = amax.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        global_scale = E4M3_MAX * E2M1_MAX / token_amax
    scale = effective_scales(grid, scales_from_amax(grid, amax, torch.float32, global_scale), global_scale)
    scaled = blocks / scale.unsqueeze(-1)
    rounded = _through(scaled, e2m1_values(e2m1_codes(scaled)))
    return (rounded * scale.unsqueeze(-1)).flatten(-2).to(original)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [N, K] (K even) -> uint8 [N, K/2], the even column in the low nibble (compressed-tensors')."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | codes[:, 1::2] << 4


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


@dataclass
class FloatWeight:
    """Floating-point weights (the float formats above): FP8 E4M3 per channel or per 128x128 block, NVFP4 and
    MXFP4. ``codes`` are the elements' bit patterns (E4M3 bytes, or E2M1 nibbles ``sign << 3 | index``),
    ``scales`` one per scale group (the scale dtype for FP8, E4M3 for NVFP4, E8M0 exponents for MXFP4), and
    NVFP4 has one fp32 ``global_scale``: ``w = element(code) * scale [/ global_scale]``."""

    codes: torch.Tensor = tensor_field()  # uint8 [N, K]
    scales: torch.Tensor = tensor_field()  # [ceil(N / block_rows), G]
    global_scale: torch.Tensor | None = tensor_field(optional=True)  # fp32 [1], NVFP4 only
    grid: str = "fp8"  # a name of ``FLOAT_GRIDS``

    kind = "float"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def spec(self):
        return FLOAT_GRIDS[self.grid]

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, grid: str, scale_dtype: torch.dtype, global_scale: torch.Tensor | None = None
    ) -> FloatWeight:
        """Round-to-nearest of an [N, K] weight on ``grid`` with min-max scales (NVFP4: under ``global_scale``
        when given)."""
        spec = FLOAT_GRIDS[grid]
        scales, global_scale = grid_params(spec, weight, scale_dtype, global_scale=global_scale)
        return cls(round_to_grid(spec, weight, scales, global_scale), scales, global_scale, grid)

    def rows(self, rows: slice) -> FloatWeight:
        start, stop, _ = rows.indices(self.shape[0])
        block = self.spec.block_rows
        if start % block:
            raise ValueError(f"{self.grid} rows are sliced at multiples of {block}, not at {start}")
        scale_rows = slice(start // block, -(-stop // block))
        return FloatWeight(self.codes[rows], self.scales[scale_rows], self.global_scale, self.grid)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = decode(self.spec, self.codes, self.scales, self.global_scale)
        return weight.to(dtype or (self.scales.dtype if self.spec.scale == "float" else torch.float32))

    def bits_per_weight(self) -> float:
        """Elements, their scales (stored width) and the global scale, as exported."""
        n, k = self.shape
        scale_bits = self.spec.scale_bits(self.scales.element_size() * 8)
        global_bits = 32 if self.global_scale is not None else 0
        return self.bits + (self.scales.numel() * scale_bits + global_bits) / (n * k)
