"""Floating-point number formats: FP8 E4M3 and FP4 E2M1 elements with their scales (FP8 per channel or per
128x128 block, NVFP4, MXFP4). The one definition of their rounding, used by float weights
(``values.FloatWeight``), float activations (``modules/activations.py``) and every quantizer on these grids.

Specifications, and compressed-tensors 0.20 (whose quantize functions the tests compare against):

* **E4M3** (OCP FP8, ``torch.float8_e4m3fn``): max 448, round to nearest even, saturating (values are
  clamped to +-448 before the cast, as compressed-tensors does). Per-channel or per-block scale
  ``s = amax / 448`` in the scale dtype (an all-zero group gets the dtype's epsilon).
* **E2M1** (OCP MX v1.0 section 5.3.3): values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; conversion is
  round to nearest, ties to even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
  saturating at 6. A code is the 4-bit ``sign << 3 | magnitude index`` (index into ``E2M1_VALUES``).
* **NVFP4** (NVIDIA, "Introducing NVFP4", 2025; compressed-tensors ``TENSOR_GROUP``): blocks of 16, each an
  E4M3 scale, and one fp32 global scale per tensor ``g = 448 * 6 / amax(tensor)``. The stored block scale is
  ``e4m3(g * amax(block) / 6)``; an element is ``q = e2m1(x / (s / g))`` and comes back as ``q * (s / g)``.
* **MXFP4** (OCP MX v1.0): blocks of 32 sharing an E8M0 scale ``2**(e - 127)``. The OCP reference picks
  ``e = floor(log2 amax) - 2`` (2 = emax of E2M1), which saturates a block's top values whenever its max has
  a mantissa >= 1.5. We follow compressed-tensors (what llm-compressor writes and vLLM reads): ``amax`` is
  first rounded to a power of two keeping one mantissa bit (up when its mantissa is >= 1.75), so fewer block
  maxima are clipped; the stored format is the same either way.

``FloatGrid`` names one of these schemes (``FLOAT_GRIDS``); ``grid_params`` computes its scales from a
weight, ``round_to_grid`` its codes given the scales, ``decode`` the values back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of codes 0..7
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E4M3_EPS = 0.125  # an all-zero block's E4M3 scale (compressed-tensors' choice)
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
    grid: FloatGrid, weight: torch.Tensor, scale_dtype: torch.dtype, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales of ``weight`` [N, K] on ``grid`` (``clip`` shrinks each group's range first), and the
    global scale (NVFP4; None otherwise)."""
    global_scale = nvfp4_global_scale(weight) if grid.global_scale else None
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


def fake_quantize_float_tokens(x: torch.Tensor, format: str) -> torch.Tensor:
    """``x`` [..., C] through a dynamic float quantizer and back (FP4 computed in fp32):

    * ``fp8``: one scale per token ``amax / 448``, elements E4M3 (compressed-tensors' FP8_DYNAMIC);
    * ``mxfp4``: blocks of 32 channels with E8M0 scales (the MXFP4 weight rule), elements E2M1;
    * ``nvfp4``: blocks of 16 with E4M3 scales under a global scale ``448 * 6 / amax`` taken per token
      (compressed-tensors calibrates that global scale once per layer instead: see ``serving.py``)."""
    original = x.dtype
    if format == "fp8":  # in x's dtype, as compressed-tensors computes it (the same logits in bf16)
        scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
        scale = torch.where(scale == 0, torch.finfo(original).eps, scale)
        scaled = x / scale
        rounded = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(original)
        return _through(scaled, rounded) * scale
    x = x.float()
    grid = FLOAT_GRIDS[format]
    channels = x.shape[-1]
    if channels % grid.group_size:
        raise ValueError(f"{format} activations need channels in multiples of {grid.group_size}, not {channels}")
    blocks = x.unflatten(-1, (channels // grid.group_size, grid.group_size))
    amax = blocks.abs().amax(dim=-1)
    global_scale = None
    if grid.global_scale:
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
