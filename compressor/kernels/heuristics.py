"""Config heuristics: the kernel config a key runs when no table entry (``tables.py``) and no tuning
names one, and the bounded candidate list that tuning times.

``gpu_config`` is the reasoning the shipped tables were seeded from (``benchmarks/seed_kernel_tables.py``);
``default_config`` is that for this device's SM count, or under ``TRITON_INTERPRET=1`` the fewest,
largest tiles; ``candidate_configs`` the pruned space that ``COMPRESSOR_AUTOTUNE=on``,
``compressor tune`` and the benchmark's ``--tune`` time (``tune.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import triton

from compressor.kernels.codes import INTERPRETED
from compressor.kernels.tables import KernelConfig

DECODE_MAX_M = 16  # M <= this: the one-launch decode kernel (without outliers)
# heuristic: from here dequantize + cuBLAS (the H200 run: fused tiles 0.1-0.5x fp16 there); the table decides
DEQUANT_MIN_M = 64
MAX_CANDIDATES = 16  # bounded tuning: a key is timed over at most this many configs


def schedule_for(m: int) -> str:
    """The heuristic schedule by rows of x (the shipped tables override it per shape)."""
    if m <= DECODE_MAX_M:
        return "decode"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def min_block_k(bits: int) -> int:
    """Smallest K-tile holding whole packed words of every plane: 32 codes when there is a 1-bit
    plane (odd widths), 16 for 2/6-bit, 8 for 4-bit, 4 for 8-bit."""
    return 32 // (bits & -bits)


def check_block_k(config: KernelConfig, bits: int) -> None:
    """Refuse a K-tile that would split a packed word of a ``bits``-bit code."""
    if config.block_k % min_block_k(bits):
        raise ValueError(
            f"block_k={config.block_k} splits a packed word of a {bits}-bit code (min_block_k = {min_block_k(bits)})"
        )


SHARED_BLOCK_N = 1024  # lut_shared.MIN_BLOCK_N (no triton import here)


def decode_warps(block_m: int, block_n: int, bits: int = 4) -> int:
    """Warps of a decode program: on CUDA cores four columns per thread (BLOCK_N / 128), so each
    thread's x conversion and address arithmetic serve four columns -- sm_90 SASS at 4 bits: 5.7
    instructions per weight at 512 columns x 4 warps or 128 x 1, 9.3 at 128 x 4 -- which is also
    what gemlite's Hopper GEMV winners use (128/256/512 columns with 1/2/4 warps). The widths decoded
    as denormal fields at one row (3-bit "tens", 2/4/8-bit planes: one AND and one FMA per code, x
    loaded, converted, scaled and summed once per code and thread) sixteen at one row, so that x's
    four instructions per code cost a quarter per weight (issue 31: 2-bit 2.46 per weight at 512 x 1
    warp, unroll 4, against 2.97 at 512 x 2 warps; ``decode_unroll``). tl.dot: 4."""
    if block_m >= 16:
        return 4
    if block_m == 1 and bits in (2, 3, 4, 8):
        return max(1, min(8, block_n // 512))
    return max(1, min(8, block_n // (256 if bits == 3 else 128)))


def decode_fields(block_m: int) -> bool:
    """Decode 2/4/8-bit codes as denormal fields (``codes.plane_products``) at one row only: its x
    costs are per row, so at 4 rows (sm_90, 4-bit, 256 x 16) it spends 13.0 instructions per weight
    against 10.6 for the mantissa decode."""
    return block_m == 1


def decode_unroll(block_m: int, bits: int) -> int:
    """K-tiles a uniform decode program sums between two group-scale applications (``unroll``;
    clamped to one group in the kernel), for the field decode at one row: it moves the scale, the
    2**C rescaling and the sum of x's products out of the tiles. As deep as sixteen columns per
    thread allow without spills (ptxas, sm_90, 512 x 1 warp): 2-bit 4 (2.46 instructions per weight,
    217 registers; 2.53 at 2), 4- and 8-bit 2 (2.67 / 2.94, ~95 registers; 4-bit at 4 spills), 3-bit
    "tens" (tiles twice as deep) 1 (2.77, 138 registers; 2 spills)."""
    if block_m == 1 and bits in (2, 4, 8):
        return 4 if bits == 2 else 2
    return 1


def codebook_config(config: KernelConfig, bits: int) -> KernelConfig:
    """A codebook weight's config: decode on CUDA cores with 2/4/8-bit codes indexes the code-major
    table (``lut="codemajor"``: sm_90 SASS at 4 bits, 512 x 16, 4 warps: 7.6 instructions per
    weight against 8.1 for the register table and 9.4 for the global one; eight columns per thread
    would give 6.9 but spill); at one row and 4 bits the same table in shared memory (``lut="shared"``,
    ``lut_shared.py``: 4.84 per weight at 1024 columns x 4 warps, ~150 registers; 4.75 at 2 warps in
    254; the split scaled to keep the program count); anything else as it is."""
    if config.schedule == "decode" and config.block_m == 1 and bits == 4:
        scale = max(1, SHARED_BLOCK_N // config.block_n)
        return replace(
            config,
            lut="shared",
            block_n=SHARED_BLOCK_N,
            num_warps=4,
            split_k=min(64, config.split_k * scale),
            unroll=1,
        )
    if config.schedule == "decode" and config.block_m < 16 and bits in (2, 4, 8):
        return replace(config, lut="codemajor", num_warps=max(1, min(8, config.block_n // 128)), unroll=1)
    return config


def decode_block_k(block_m: int, group_size: int, bits: int) -> int:
    """K-tile of the decode kernel. CUDA-core rows (BLOCK_M < 16): lean, 16 codes (32 for odd
    widths, whose 1-bit plane holds 32 per word) -- gemlite's Hopper GEMV winners take 16
    K-elements per program, and ptxas (sm_90) gives our 4-bit decode 72 registers at 16 deep for
    128..512 columns against 162 at 64 deep x 128 columns, i.e. more programs resident per SM to
    keep loads in flight. tl.dot rows (BLOCK_M = 16): 64, dividing the group when possible."""
    if block_m < 16:
        return max(16, min_block_k(bits))
    return max(min_block_k(bits), _block_k_for(group_size, 64))


def _block_k_for(group_size: int, preferred: int) -> int:
    """``preferred``, shrunk to a power of two >= 16 dividing the group so scales load as one row."""
    if group_size == -1:
        return preferred
    block = preferred
    while block > 16 and group_size % block:
        block //= 2
    return block


def split_k_for(tiles: int, k: int, block_k: int, target_programs: int, cap: int = 1 << 30) -> int:
    """The fewest power-of-two K-splits with tiles * split >= target_programs, but at most ``cap``
    and the number of K-tiles."""
    k_tiles = triton.cdiv(k, block_k)
    wanted = triton.next_power_of_2(max(1, -(-target_programs // max(tiles, 1))))
    return max(1, min(wanted, _pow2_floor(k_tiles), _pow2_floor(cap)))


def decode_split_cap(m: int, k: int, bits: int) -> int:
    """Most K-splits worth having at decode (at most 64): the fp32 partials, written and read back
    (8 bytes per split, row and column; they stay in L2), under half the packed weight (K * bits / 8
    bytes per column)."""
    return max(1, min(64, (k * bits) // (128 * max(m, 1))))


def decode_block_m(m: int) -> int:
    """Rows per decode program: all of M; CUDA cores up to 4 rows, tensor cores (16) above."""
    return triton.next_power_of_2(max(m, 1)) if m <= 4 else 16


@functools.cache
def _cuda_sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index)
    return 132  # H100 SXM


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device, bits: int = 4) -> KernelConfig:
    """A sound config without a table entry or tuning: ``gpu_config`` for this device's SM count;
    under the interpreter the fewest, largest tiles (programs run one after another in Python)."""
    if INTERPRETED:
        schedule = schedule_for(m)
        block_n, block_k = min(128, max(16, triton.next_power_of_2(n))), min(128, max(32, triton.next_power_of_2(k)))
        if schedule == "decode":
            return KernelConfig("decode", decode_block_m(m), block_n, block_k, fields=decode_fields(decode_block_m(m)))
        return KernelConfig(schedule, min(128, max(16, triton.next_power_of_2(m))), block_n, block_k)
    return gpu_config(m, n, k, group_size, sm_count(device), bits)


def gpu_config(m: int, n: int, k: int, group_size: int, sms: int, bits: int = 4) -> KernelConfig:
    """The heuristic behind the shipped tables (the kernels' structure, before any measurement).

    decode: all M rows in one program; on CUDA cores BLOCK_N 512 halved down to 128 (tensor-core
    rows: 64 down to 32) until the N-tiles times the split cap give two programs per SM, four
    columns per thread (``decode_warps``; sixteen for the field decode, with ``decode_unroll`` tiles
    per unit); then split-K up to that many programs, capped so the
    partials stay small (``decode_split_cap``). gemm below DEQUANT_MIN_M, dequantize + cuBLAS above.
    """
    schedule = schedule_for(m)
    target = 2 * sms
    if schedule == "decode":
        block_m = decode_block_m(m)
        cap = decode_split_cap(m, k, bits)
        block_n = 512 if block_m < 16 else 64
        while block_n > (128 if block_m < 16 else 32) and triton.cdiv(n, block_n) * cap < target:
            block_n //= 2
        block_k = decode_block_k(block_m, group_size, bits)
        unroll = decode_unroll(block_m, bits)
        split = split_k_for(triton.cdiv(n, block_n), k, block_k * unroll, target, cap)
        return KernelConfig(
            "decode",
            block_m,
            block_n,
            block_k,
            split_k=split,
            num_warps=decode_warps(block_m, block_n, bits),
            num_stages=2,
            unroll=unroll,
            fields=decode_fields(block_m),
        )
    if schedule == "dequant":
        return KernelConfig("dequant", block_n=128, block_k=64, num_warps=4, num_stages=1)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n, block_k = 64, max(min_block_k(bits), _block_k_for(group_size, 64))
    split = split_k_for(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, target)
    return KernelConfig("gemm", block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=3)


def candidate_configs(
    m: int, n: int, k: int, group_size: int, device: torch.device, bits: int = 4, lut: bool = False
) -> list[KernelConfig]:
    """The pruned autotuning space (at most MAX_CANDIDATES, so tuning a shape takes seconds, not minutes).

    decode: BLOCK_N 512/256/128 (gemlite's Hopper GEMV winners are 128-512 wide) x the split that
    fills the GPU, half and double of it, four (or two) columns per thread, the lean K-tile and one
    64 deep, uniform
    CUDA-core rows also 4 tiles unrolled between reductions (``unroll``); codebooks also try
    ``lut="registers"`` (and the code-major table, in global memory and, at one row and 4 bits, in
    shared memory: ``lut="shared"``, the first candidate there).
    Uniform 2/4/8-bit decode on CUDA cores also tries the mantissa decode (``fields=False``) that the
    denormal fields replaced. M > 16: the fused tile (tiled and split-K, two tile sizes) against
    dequantize + cuBLAS. On a GPU,
    4-bit weights with groups of 32..256 also try torch's int4 tinygemm (``tinygemm.py``).
    """
    first = default_config(m, n, k, group_size, device, bits)
    if lut:
        first = codebook_config(first, bits)
    configs = [first]
    target = 2 * sm_count(device)
    block_k = max(min_block_k(bits), _block_k_for(group_size, 64))
    if first.schedule == "decode":  # most telling first: a truncated list still spans the space
        cap = decode_split_cap(m, k, bits)
        widths = (512, 256, 128) if first.block_m < 16 else (64, 128, 32)

        def split_for(block_n):
            return split_k_for(triton.cdiv(n, block_n), k, block_k, target, cap)

        lean = decode_block_k(first.block_m, group_size, bits)
        deep = max(lean, _block_k_for(group_size, 64))
        unroll = 1 if lut or first.block_m >= 16 else 4

        def warps(bn):
            return decode_warps(first.block_m, bn, bits)

        shapes = [(bn, split_for(bn), warps(bn), lean, unroll) for bn in widths[:2]]
        shapes += [(bn, split_for(bn), warps(bn), lean, 1) for bn in widths]
        shapes += [(widths[0], split_for(widths[0]), warps(widths[0]), deep, 1)]
        shapes += [(bn, split_for(bn), 2 * warps(bn), lean, 1) for bn in widths]
        shapes += [
            (bn, s, warps(bn), lean, 1)
            for bn in widths[:2]
            for s in (min(2 * split_for(bn), cap), max(1, split_for(bn) // 2))
        ]
        modes = ("global", "registers") if lut else ("global",)
        if lut and first.block_m < 16 and bits in (2, 4, 8):
            modes = ("codemajor", *modes)
        for block_n, split_k, warps, depth, tiles in shapes:
            for mode in modes:
                config = KernelConfig(
                    "decode", first.block_m, block_n, depth, split_k, num_warps=warps, unroll=tiles, fields=first.fields
                )
                if mode == "codemajor":  # four columns per thread (codebook_config's code-major width)
                    config = replace(config, lut=mode, num_warps=max(1, min(8, block_n // 128)), unroll=1)
                configs.append(replace(config, lut=mode))
    else:
        block_m = min(64, max(16, triton.next_power_of_2(m))) if m < 128 else 128
        for block_n in (64, 128):
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            for split_k in sorted({1, split_k_for(tiles, k, block_k, target)}):
                for warps, stages in ((4, 3), (8, 4)):
                    configs.append(
                        KernelConfig("gemm", block_m, block_n, block_k, split_k, num_warps=warps, num_stages=stages)
                    )
        configs += [
            KernelConfig("dequant", block_n=bn, block_k=64, num_warps=w, num_stages=1) for bn, w in ((128, 4), (256, 8))
        ]
    if first.schedule == "decode" and first.block_m == 1 and not lut and bits in (2, 4, 8):  # the decode it replaced
        configs.insert(1, replace(first, fields=False, num_warps=max(1, min(8, first.block_n // 128))))
    if device.type == "cuda" and not lut and bits == 4 and group_size in (32, 64, 128, 256):
        configs.insert(1, KernelConfig("tinygemm"))  # torch's int4 kernel competes where it serves the format
    seen, unique = set(), []
    for config in configs:
        if config not in seen:
            seen.add(config)
            unique.append(config)
    return unique[:MAX_CANDIDATES]
