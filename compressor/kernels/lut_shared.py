"""Codebook decode at M = 1 with the codebooks in shared memory (``lut="shared"``, 4-bit codes, GPU only).

Per weight a per-row codebook needs one data-dependent lookup. From global memory (``codes.codebook_products``,
``lut="codemajor"``) that lookup costs a 64-bit address (two LEAs) on top of the load (sm_90: 7.6
instructions per weight against a 4-bit budget of 5.0), and a warp's 32 lookups land in up to 16
different 128-byte lines (one per distinct code), which the L1 serves one line per cycle: ~8-14
cycles per warp-load where the bandwidth at M = 1 allows ~1.25. A shared-memory table indexed
code-major, ``smem[code, n]`` with a warp's lanes on 32 adjacent columns, puts every lane in its own
bank whatever the codes (bank = n mod 32): one cycle per warp-load, and a 32-bit address.

This is FLUTE's idea (Guo et al. 2024, arXiv 2407.10960: the lookup table in shared memory, read
with 32-bit addresses, conflict-free by construction) for SqueezeLLM's per-row codebooks: FLUTE
keeps one table of 2-code pairs per group and decodes for tensor cores; here each program copies
its BLOCK_N columns of the code-major fp32 table (``packing.codebook_table``, 16 x 1024 x 4 B = 64 KB)
into shared memory once, and each weight costs one LOP3 (its 4 bits masked in place), one LEA
(shifted to the table row and added to the column's address), one LDS and one FMA (sm_90 SASS of
the K loop at 1024 columns x 4 warps: 4.84 per weight; ``benchmarks/kernel_sass.py``). Plain Triton cannot express this:
``tl.gather`` lowers to warp shuffles (5 SHFL per weight measured) and its layouts are the
compiler's; so the kernel is written in Gluon (explicit layouts: one column per lane, all of a
thread's codes in its registers) and the lookup is one ``ld.shared`` in inline PTX, addressed from
Triton's ``global_smem`` (the table is the kernel's only shared allocation, so it starts there;
``tests/kernels/test_compile_sm90.py`` checks the kernel's shared size equals the table's).

Neither Gluon nor inline PTX runs in the Triton interpreter: on the CPU (and for M > 1, 2/8-bit
codes, outliers) ``lut.lut_linear`` runs the code-major Triton decode instead, which computes the
same sums from the same fp32 table; the tests check that path against the reference, and the GPU
tests (``tests/kernels/test_gpu_kernels.py``) this kernel. Split-K partials are added atomically
into an fp32 row (zeroed), then the bias and the cast: three launches, where the Triton decode
has one.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

MIN_BLOCK_N = 1024  # the table's row stride (BLOCK_N * 4 bytes) must be >= 2**12: see _lookup


@gluon.constexpr_function
def _lookup(position, stride_log2):
    """PTX: the fp32 entry smem[code, n] for the 4-bit code at bit ``position`` (<= 12) of word $1,
    with $2 the column's shared address: mask in place, shift to the row (stride 2**stride_log2
    bytes) and add (ptxas: LOP3, LEA), then one ``ld.shared``."""
    mask, shift = 15 << position, stride_log2 - position
    return f"{{ .reg .b32 t; and.b32 t, $1, {mask}; shl.b32 t, t, {shift}; add.u32 t, t, $2; ld.shared.f32 $0, [t]; }}"


@gluon.jit
def _shared_lut_kernel(
    x_ptr,
    w_ptr,
    table_ptr,
    out_ptr,
    N,
    K,
    NP,
    stride_xk,
    SPLIT_K,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    LOG_N: gl.constexpr,
    WARPS: gl.constexpr,
    EVEN_K: gl.constexpr,
):
    """out[n] += sum_k x[k] table[code[k, n], n] over this program's K-tiles (atomic fp32)."""
    columns: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])  # lane = column (mod 32): no bank conflicts
    rows: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, WARPS], [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n_table = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, rows))
    codes = gl.arange(0, 16, layout=gl.SliceLayout(1, rows))
    entries = gl.load(
        table_ptr + codes[:, None] * NP + n_table[None, :], mask=(n_table < N)[None, :], other=0.0
    )  # [16, BLOCK_N] fp32: the program's columns of the code-major table
    table = gl.allocate_shared_memory(
        gl.float32, [16, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), entries
    )  # row-major, unswizzled: smem[code, n] at global_smem + (code * BLOCK_N + n) * 4
    gl.barrier()  # the lookups below are inline PTX, which Triton's barrier analysis does not see
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=columns)
    mask_n = offs_n < N
    column = gl.inline_asm_elementwise(
        "{ .reg .b32 t; mov.b32 t, global_smem; add.u32 $0, t, $1; }",
        "=r,r",
        [gl.arange(0, BLOCK_N, layout=columns) * 4],
        dtype=gl.int32,
        is_pure=True,
        pack=1,
    )
    acc = gl.zeros([BLOCK_N], gl.float32, columns)
    tiles = gl.cdiv(K, BLOCK_K)
    per = gl.cdiv(tiles, SPLIT_K)
    for tile in range(pid_k * per, gl.minimum(tiles, pid_k * per + per)):
        k0 = tile * BLOCK_K
        for r in gl.static_range(BLOCK_K // 8):
            word = gl.load(w_ptr + (k0 // 8 + r) * N + offs_n, mask=mask_n, other=0, eviction_policy="evict_first")
            high = word >> 16  # codes 4..7 at bits 0..12 (the sign bits shifted in are masked off)
            for j in gl.static_range(8):
                if j < 4:
                    source = word
                else:
                    source = high
                entry = gl.inline_asm_elementwise(
                    _lookup(4 * (j % 4), LOG_N + 2), "=f,r,r", [source, column], dtype=gl.float32, is_pure=True, pack=1
                )
                k = k0 + 8 * r + j
                if EVEN_K:
                    x = gl.load(x_ptr + k * stride_xk).to(gl.float32)
                else:
                    x = gl.load(x_ptr + k * stride_xk, mask=k < K, other=0.0).to(gl.float32)
                acc += x * entry
    # Triton sees only this read of the table (the lookups are PTX): reading it after the loop keeps the
    # allocation live, so no scratch buffer is placed over it while the loop runs
    acc += gl.convert_layout(gl.sum(table.load(rows), 0), columns) * 0.0
    gl.atomic_add(out_ptr + offs_n, acc, mask=mask_n, sem="relaxed")


def shared_lut_decode(x: torch.Tensor, packed, bias, config) -> torch.Tensor:
    """y [1, N] in x's dtype for one row x [1, K] and 4-bit codebook weights with a code-major table
    (``packing.PackedLUT``); ``config``: BLOCK_N (at least MIN_BLOCK_N), BLOCK_K, warps, split."""
    n, k = packed.shape
    block_n = max(MIN_BLOCK_N, config.block_n)
    block_k = max(16, config.block_k)
    out = torch.zeros(1, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), config.split_k)
    _shared_lut_kernel[grid](
        x,
        packed.packed,
        packed.table,
        out,
        n,
        k,
        packed.table.shape[1],
        x.stride(1),
        config.split_k,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        LOG_N=block_n.bit_length() - 1,
        WARPS=config.num_warps,
        EVEN_K=k % block_k == 0,
        num_warps=config.num_warps,
    )
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
