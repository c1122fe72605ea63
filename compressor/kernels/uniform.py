"""Triton kernels for y = x W^T with uniform (affine) low-bit weights, any width 1..8.

Sources: MARLIN (arXiv 2408.11743) for the memory-bound design at small batch (dequantize inside
the K loop, fp32 accumulation, split the reduction so enough SMs stream weights); Tilus (arXiv
2504.12984) for arbitrary widths as compositions of power-of-two loads; gemlite
(mobiusml/gemlite ``gemv_revsplitK_kernels.py``, ``gemm_splitK_kernels.py``, ``utils.py``) for
the Triton structure: K-packed weights stored N-contiguous, the ``offs_k // per_word`` unpack
idiom, ``w = u * s + zs`` dequantization and split-K with atomic adds.

One family, three schedules (the weight kind is a constexpr ``DEQUANT`` function, so the LUT
kernels in ``lut.py`` are these same schedules with a codebook lookup plugged in):

* ``gemv`` (M = 1, memory-bound): no tensor cores. grid = (N tiles, SPLIT_K, M); program
  (n, s) walks K-tiles s, s + SPLIT_K, ... and reduces ``sum_k w[k, n] * x[k]`` in fp32.
* ``gemm`` (2 <= M <= 1024): ``tl.dot`` on a dequantized [BLOCK_K, BLOCK_N] tile, grouped-M
  tile order, optional split-K (small M: more programs streaming weights; large M: SPLIT_K = 1,
  the tiled GEMM).
* ``dequant`` (prefill, M > 1024): one pass writes W in x's dtype, then cuBLAS via ``F.linear``.

Split-K partial sums (and the sparse outliers, ``sparse.py``) are atomically added into an fp32
workspace, then cast to x's dtype with the bias; with SPLIT_K = 1 and no outliers the kernel
stores the final output directly. Activations are converted right after ``tl.load``: to fp32 on
the CUDA-core paths, and to the ``tl.dot`` operand type on the tensor-core path (fp16 stays
fp16, bf16 stays bf16 on a GPU but becomes fp32 under ``TRITON_INTERPRET=1``, whose bf16
arithmetic is silently wrong; fp32 uses ``input_precision="ieee"``).

Scales are loaded as one [1, BLOCK_N] row per K-tile when a tile never crosses a group boundary
(``group % BLOCK_K == 0`` or per-channel), else as a [BLOCK_K, BLOCK_N] tile indexed by
``k // group`` (gemlite's ``load_scales_as_block`` distinction), so any group size, including
groups that do not divide K, is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compressor.kernels.packing import PackedOutliers, PackedUniform
from compressor.kernels.sparse import outlier_add

GEMV_MAX_M = 1  # M <= this: gemv; spec start values, to be refined by benchmarks/kernels.py on H100
SPLITK_MAX_M = 64  # gemm with split-K up to here, tiled gemm (SPLIT_K = 1) above
DEQUANT_MIN_M = 1025  # M* of kernels.md section 3: from here dequantize + cuBLAS


# --------------------------------------------------------------------------------------------
# device helpers (shared with lut.py)


@triton.jit
def _load_plane(w_ptr, offs_k, offs_n, mask, rows_per_bit, N, BITS: tl.constexpr, WIDTH: tl.constexpr):
    """The WIDTH-bit plane of codes [offs_k, offs_n], shifted to its place in the code."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    first_row = rows_per_bit * (BITS - (BITS & (2 * WIDTH - 1)))  # the wider planes come first
    rows = first_row + offs_k // PER_WORD
    words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first")
    shift = (offs_k % PER_WORD) * WIDTH
    return ((words >> shift[:, None]) & ((1 << WIDTH) - 1)) << (BITS & (WIDTH - 1))


@triton.jit
def load_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, rows_per_bit, N,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unsigned codes [BLOCK_K, BLOCK_N] (int32) from the planes layout of ``packing.py``."""
    mask = mask_k[:, None] & mask_n[None, :]
    u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    if BITS & 8:
        u |= _load_plane(w_ptr, offs_k, offs_n, mask, rows_per_bit, N, BITS, 8)
    if BITS & 4:
        u |= _load_plane(w_ptr, offs_k, offs_n, mask, rows_per_bit, N, BITS, 4)
    if BITS & 2:
        u |= _load_plane(w_ptr, offs_k, offs_n, mask, rows_per_bit, N, BITS, 2)
    if BITS & 1:
        u |= _load_plane(w_ptr, offs_k, offs_n, mask, rows_per_bit, N, BITS, 1)
    return u


@triton.jit
def dequant_affine(u, offs_k, offs_n, mask_k, mask_n, k0, scale_ptr, zs_ptr, N,
                   BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, SCALE_ROW: tl.constexpr):
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
        zs = tl.load(zs_ptr + meta, mask=meta_mask, other=0.0)
        return u.to(tl.float32) * s + zs
    return (u - (1 << (BITS - 1))).to(tl.float32) * s


@triton.jit
def _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:  # fp32 workspace; the wrapper adds the bias after the last partial sum
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# the three schedules


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, meta_ptr, zs_ptr, bias_ptr, out_ptr,
                 N, K, rows_per_bit, stride_xm, stride_xk,
                 DEQUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                 SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0, eviction_policy="evict_last")
        x = x.to(tl.float32)
        u = load_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
        w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, N, BITS, GROUP, ASYM, SCALE_ROW)
        acc += tl.sum(w * x[:, None], axis=0)
    offs_m = m + tl.arange(0, 1)
    _epilogue(out_ptr, bias_ptr, acc[None, :], offs_m, offs_n, offs_m >= 0, mask_n, N, HAS_BIAS, ATOMIC)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, meta_ptr, zs_ptr, bias_ptr, out_ptr,
                 M, N, K, rows_per_bit, stride_xm, stride_xk,
                 DEQUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                 SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering (Triton matmul tutorial): GROUP_M row tiles in a row reuse weight tiles from L2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % rows_in_group
    pid_n = (pid % tiles_per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_last")
        x = x.to(DOT_DTYPE)
        u = load_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
        w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, N, BITS, GROUP, ASYM, SCALE_ROW)
        acc = tl.dot(x, w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    _epilogue(out_ptr, bias_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, HAS_BIAS, ATOMIC)


@triton.jit
def _dequant_kernel(w_ptr, meta_ptr, zs_ptr, out_ptr, N, K, rows_per_bit,
                    DEQUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
                    SCALE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    u = load_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, rows_per_bit, N, BITS, BLOCK_K, BLOCK_N)
    w = DEQUANT(u, offs_k, offs_n, mask_k, mask_n, k0, meta_ptr, zs_ptr, N, BITS, GROUP, ASYM, SCALE_ROW)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


INTERPRETED = type(_gemv_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


# --------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one schedule (``gemv``, ``gemm`` or ``dequant``)."""

    schedule: str
    block_m: int = 16  # gemm only
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1  # gemv / gemm
    group_m: int = 8  # gemm only
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.schedule not in ("gemv", "gemm", "dequant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.schedule == "gemm" and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError("tl.dot needs block_m, block_n, block_k >= 16")
        if self.split_k < 1:
            raise ValueError("split_k must be >= 1")

    def as_dict(self) -> dict:
        return asdict(self)


def schedule_for(m: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def _block_k_for(group_size: int, preferred: int) -> int:
    """``preferred``, shrunk to a power of two dividing the group so scales load as one row."""
    if group_size == -1:
        return preferred
    block = preferred
    while block > 16 and group_size % block:
        block //= 2
    return block


def _split_k(tiles: int, k: int, block_k: int, target_programs: int) -> int:
    """Enough K-splits that tiles * split >= target_programs, never more than there are K-tiles."""
    k_tiles = triton.cdiv(k, block_k)
    return max(1, min(_pow2_floor(target_programs / max(tiles, 1)), _pow2_floor(k_tiles)))


@functools.cache
def _cuda_sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index)
    return 132  # H100 SXM


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> KernelConfig:
    """A sound config without tuning: H100-sized, split-K so that ~2 programs run per SM."""
    schedule = schedule_for(m)
    if INTERPRETED:  # programs run one after another in Python: the fewest, largest tiles are fastest
        block_n, block_k = (min(128, max(16, triton.next_power_of_2(d))) for d in (n, k))
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        return KernelConfig(schedule, block_m if schedule == "gemm" else 16, block_n, block_k)
    target = 2 * sm_count(device)
    if schedule == "gemv":
        block_n, block_k = 128, _block_k_for(group_size, 64)
        split = _split_k(triton.cdiv(n, block_n), k, block_k, target)
        return KernelConfig("gemv", block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=2)
    if schedule == "dequant":
        return KernelConfig("dequant", block_n=64, block_k=64, num_warps=4, num_stages=1)
    if m <= SPLITK_MAX_M:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        block_n, block_k = 64, _block_k_for(group_size, 64)
        split = _split_k(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, target)
        return KernelConfig("gemm", block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=3)
    block_m = 64 if m <= 128 else 128
    return KernelConfig("gemm", block_m, 128, _block_k_for(group_size, 64), split_k=1, num_warps=8 if block_m == 128 else 4, num_stages=3)


def candidate_configs(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[KernelConfig]:
    """Autotuning space for H100-class GPUs (seeded from gemlite's configs/h100.json winners)."""
    schedule = schedule_for(m)
    target = 2 * sm_count(device)
    configs = [default_config(m, n, k, group_size, device)]
    if schedule == "gemv":
        for block_n in (128, 256, 512):
            for block_k in (32, 64, 128):
                split = _split_k(triton.cdiv(n, block_n), k, block_k, target)
                for split_k in sorted({split, max(1, split // 2), split * 2}):
                    for warps in (2, 4):
                        configs.append(KernelConfig("gemv", block_n=block_n, block_k=block_k, split_k=split_k,
                                                    num_warps=warps, num_stages=1))
    elif schedule == "dequant":
        configs += [KernelConfig("dequant", block_n=bn, block_k=bk, num_warps=4, num_stages=1) for bn in (64, 128) for bk in (64, 128)]
    elif m <= SPLITK_MAX_M:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        for block_n in (32, 64, 128):
            for block_k in (64, 128, 256):
                split = _split_k(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, target)
                for split_k in sorted({1, split, split * 2}):
                    for stages in (2, 3):
                        configs.append(KernelConfig("gemm", block_m, block_n, block_k, split_k, num_warps=4, num_stages=stages))
    else:
        for block_m in (64, 128):
            for block_n in (64, 128, 256):
                for block_k in (32, 64, 128):
                    for warps, stages in ((4, 3), (8, 3), (8, 4)):
                        configs.append(KernelConfig("gemm", block_m, block_n, block_k, 1, num_warps=warps, num_stages=stages))
    seen, unique = set(), []
    for config in configs:
        if config not in seen:
            seen.add(config)
            unique.append(config)
    return unique


# --------------------------------------------------------------------------------------------
# launch wrappers


def _dot_type(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16:
        return (tl.float32 if INTERPRETED else tl.bfloat16), "tf32"
    if dtype == torch.float32:
        return tl.float32, "ieee"
    raise TypeError(f"activations must be fp16, bf16 or fp32, got {dtype}")


def quantized_matmul(x, packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant,
                     bias=None, config: KernelConfig | None = None, outliers: PackedOutliers | None = None):
    """y = x W^T (+ S x) (+ bias) for x [M, K]; W given by packed codes + ``dequant`` metadata.

    ``meta`` is the scales [G, N] (uniform) or the LUT [N, 2**bits]; ``zs`` the fp32 [G, N]
    zero shift or None. Used by ``uniform_linear`` and ``lut.lut_linear``.
    """
    m, k = x.shape
    n = shape[0]
    if k != shape[1]:
        raise ValueError(f"x has {k} features, the weight expects {shape[1]}")
    config = config or default_config(m, n, k, group_size, x.device)
    block_k = config.block_k
    scale_row = group_size == -1 or group_size % block_k == 0
    common = dict(DEQUANT=dequant, BITS=bits, GROUP=group_size, ASYM=zs is not None, SCALE_ROW=scale_row,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    zs_arg = zs if zs is not None else meta
    if m == 0:
        return x.new_empty(0, n)

    if config.schedule == "dequant":
        weight = dequantize_weight(packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant,
                                   x.dtype, config, outliers)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    atomic = config.split_k > 1 or outliers is not None
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else out
    args = (x, packed_codes, meta, zs_arg, bias_arg, out)
    flags = dict(HAS_BIAS=bias is not None, ATOMIC=atomic, **common)
    if config.schedule == "gemv":
        grid = (triton.cdiv(n, config.block_n), config.split_k, m)
        _gemv_kernel[grid](*args, n, k, rows_per_bit, x.stride(0), x.stride(1),
                           BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=config.split_k, **flags)
    else:
        dot_dtype, precision = _dot_type(x.dtype)
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
        _gemm_kernel[grid](*args, m, n, k, rows_per_bit, x.stride(0), x.stride(1),
                           DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                           BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
                           SPLIT_K=config.split_k, GROUP_M=config.group_m, **flags)
    if not atomic:
        return out
    if outliers is not None:
        outlier_add(x, outliers, out)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def dequantize_weight(packed_codes, rows_per_bit, shape, bits, meta, zs, group_size, dequant, dtype,
                      config: KernelConfig | None = None, outliers: PackedOutliers | None = None) -> torch.Tensor:
    """Dense W [N, K] in ``dtype`` (one pass over the packed codes), outliers scattered in."""
    n, k = shape
    config = config if config is not None and config.schedule == "dequant" else KernelConfig("dequant", block_n=64, block_k=64)
    weight = torch.empty(n, k, dtype=dtype, device=packed_codes.device)
    grid = (triton.cdiv(k, config.block_k), triton.cdiv(n, config.block_n))
    _dequant_kernel[grid](packed_codes, meta, zs if zs is not None else meta, weight, n, k, rows_per_bit,
                          DEQUANT=dequant, BITS=bits, GROUP=group_size, ASYM=zs is not None,
                          SCALE_ROW=group_size == -1 or group_size % config.block_k == 0,
                          BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                          num_warps=config.num_warps, num_stages=config.num_stages)
    if outliers is not None and outliers.nnz:
        weight.index_put_((outliers.rows.long(), outliers.cols.long()), outliers.vals.to(dtype), accumulate=True)
    return weight


def uniform_dequantize(packed: PackedUniform, dtype=torch.float16, config: KernelConfig | None = None,
                       outliers: PackedOutliers | None = None) -> torch.Tensor:
    """Dense [N, K] uniform weight through the dequantize kernel."""
    return dequantize_weight(packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.scales,
                             packed.zs, packed.group_size, dequant_affine, dtype, config, outliers)


def uniform_linear(x: torch.Tensor, packed: PackedUniform, bias=None, config: KernelConfig | None = None,
                   outliers: PackedOutliers | None = None) -> torch.Tensor:
    """y = x W^T (+ S x) (+ bias) for x [M, K] and uniform weights in the kernel layout."""
    return quantized_matmul(x, packed.packed, packed.rows_per_bit, packed.shape, packed.bits, packed.scales,
                            packed.zs, packed.group_size, dequant_affine, bias, config, outliers)
