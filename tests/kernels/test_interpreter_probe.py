"""Probes of the Triton features our kernels rely on, so that a Triton upgrade that changes any of
them fails here, loudly and by name, rather than somewhere inside a kernel test.

Run under TRITON_INTERPRET=1 on a CPU (conftest.py) and compiled on a GPU.
"""

import torch
import triton
import triton.language as tl
from kernel_helpers import DEVICE


@triton.jit
def _add_one(x):
    return x + 1


@triton.jit
def _times_two(x):
    return x * 2


@triton.jit
def _constexpr_function_argument(out_ptr, FN: tl.constexpr, BITS: tl.constexpr):
    offs = tl.arange(0, 8)
    value = FN(offs)
    if BITS & 4:  # compile-time branch on a constexpr bit test
        value += 100
    tl.store(out_ptr + offs, value)


def test_a_jit_function_as_a_constexpr_argument_and_constexpr_bit_tests():
    out = torch.empty(8, dtype=torch.int32, device=DEVICE)
    _constexpr_function_argument[(1,)](out, FN=_add_one, BITS=5)
    assert out.tolist() == [i + 101 for i in range(8)]
    _constexpr_function_argument[(1,)](out, FN=_times_two, BITS=3)
    assert out.tolist() == [2 * i for i in range(8)]


@triton.jit
def _shift_and_mask(words_ptr, out_ptr, SHIFT: tl.constexpr):
    word = tl.load(words_ptr)
    tl.store(out_ptr, word >> SHIFT)
    tl.store(out_ptr + 1, (word >> SHIFT) & 0xF)


def test_int32_right_shift_is_arithmetic_so_we_mask_after_it():
    words = torch.tensor([-0x70000000], dtype=torch.int32, device=DEVICE)  # 0x90000000
    out = torch.empty(2, dtype=torch.int32, device=DEVICE)
    _shift_and_mask[(1,)](words, out, SHIFT=28)
    assert out.tolist() == [-7, 9]  # sign-extended, and the mask recovers the top nibble 0x9


@triton.jit
def _gemv_k_packed(x_ptr, w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """4-bit codes packed along K (8 per int32), stored [K/8, N]: the unpack idiom of uniform.py,
    a loop with a runtime start, masked loads with eviction hints, atomics from every split."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        words = tl.load(
            w_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first"
        )
        codes = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc += tl.sum(codes.to(tl.float32) * x[:, None], axis=0)
    tl.atomic_add(out_ptr + offs_n, acc, mask=offs_n < N, sem="relaxed")


def test_k_packed_unpack_idiom_with_split_k_atomics():
    n, k = 24, 72
    codes = torch.randint(0, 16, (k, n), device=DEVICE)
    words = (codes.view(k // 8, 8, n) << (torch.arange(8, device=DEVICE) * 4)[None, :, None]).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    x = torch.randn(k, device=DEVICE).half()
    out = torch.zeros(n, device=DEVICE)
    _gemv_k_packed[(2, 3)](x, words, out, n, k, BLOCK_N=16, BLOCK_K=16, SPLIT=3)
    torch.testing.assert_close(out, x.float() @ codes.float(), rtol=1e-5, atol=1e-4)


@triton.jit
def _gather_through_loaded_codes(lut_ptr, codes_ptr, out_ptr, BITS: tl.constexpr):
    rows = tl.arange(0, 4)
    codes = tl.load(codes_ptr + rows[:, None] * 8 + tl.arange(0, 8)[None, :])
    tl.store(
        out_ptr + rows[:, None] * 8 + tl.arange(0, 8)[None, :], tl.load(lut_ptr + rows[:, None] * (1 << BITS) + codes)
    )


def test_gather_from_a_table_through_loaded_integer_offsets():
    lut = torch.randn(4, 8, device=DEVICE)
    codes = torch.randint(0, 8, (4, 8), dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, 8, device=DEVICE)
    _gather_through_loaded_codes[(1,)](lut, codes, out, BITS=3)
    assert torch.equal(out, lut.gather(1, codes.long()))


@triton.jit
def _dot_in_a_loop(a_ptr, b_ptr, c_ptr, K, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, 16)
    acc = tl.zeros((16, 16), dtype=tl.float32)
    for k0 in range(0, K, 16):
        a = tl.load(a_ptr + offs[:, None] * K + (k0 + offs)[None, :]).to(DOT_DTYPE)  # cast right after the load
        b = tl.load(b_ptr + (k0 + offs)[:, None] * 16 + offs[None, :]).to(tl.float32)
        acc = tl.dot(a, b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(c_ptr + offs[:, None] * 16 + offs[None, :], acc.to(c_ptr.dtype.element_ty))


def test_dot_with_fp16_and_fp32_operands_and_bf16_upcast_after_load():
    a, b = torch.randn(16, 48, device=DEVICE), torch.randn(48, 16, device=DEVICE)
    for dtype, dot_dtype, precision, tolerance in (
        (torch.float16, tl.float16, "tf32", 1e-2),
        (torch.float32, tl.float32, "ieee", 1e-5),
        (torch.bfloat16, tl.float32, "ieee", 1e-5),
    ):
        a_cast, b_cast = a.to(dtype), b.to(dtype)
        c = torch.empty(16, 16, device=DEVICE, dtype=dtype)
        _dot_in_a_loop[(1,)](a_cast, b_cast, c, 48, DOT_DTYPE=dot_dtype, PRECISION=precision)
        expected = a_cast.float() @ b_cast.float()
        assert ((c.float() - expected).abs().max() / expected.abs().max()).item() < max(
            tolerance, 2 * torch.finfo(dtype).eps
        )


@triton.jit
def _atomic_rows(out_ptr, rows_ptr, vals_ptr, n, M, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = tl.program_id(0)
    active = offs < tl.where(m < M, n, 0)  # a scalar condition folded into a vector mask
    rows = tl.load(rows_ptr + offs, mask=active, other=0)
    tl.atomic_add(out_ptr + m * 4 + rows, tl.load(vals_ptr + offs, mask=active, other=0.0), mask=active, sem="relaxed")


def test_atomic_add_applies_every_lane_with_duplicate_addresses():
    rows = torch.tensor([0, 2, 2, 2, 3, 0, 1, 2], dtype=torch.int32, device=DEVICE)
    vals = torch.arange(1, 9, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(3, 4, device=DEVICE)
    _atomic_rows[(3,)](out, rows, vals, 7, 2, BLOCK=8)  # entry 7 masked off; program 2 is past M
    assert out.tolist() == [[7.0, 7.0, 9.0, 5.0]] * 2 + [[0.0] * 4]


@triton.jit
def _expand_words(words_ptr, out_ptr, N: tl.constexpr, ROWS: tl.constexpr, PER_WORD: tl.constexpr, WIDTH: tl.constexpr):
    offs_n = tl.arange(0, N)
    words = tl.load(words_ptr + tl.arange(0, ROWS)[:, None] * N + offs_n[None, :])
    codes = (words[:, None, :] >> (tl.arange(0, PER_WORD) * WIDTH)[None, :, None]) & ((1 << WIDTH) - 1)
    codes = tl.reshape(codes, (ROWS * PER_WORD, N))  # row-major: row r, slot j -> code r * PER_WORD + j
    values = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    tl.store(out_ptr + tl.arange(0, ROWS * PER_WORD)[:, None] * N + offs_n[None, :], values)


def test_compact_words_expand_in_registers_and_the_exponent_trick_is_exact():
    """The compact code loads: a [ROWS, PER_WORD, N] broadcast shift reshaped row-major, and
    ``u | 0x4B000000`` read as fp32 equal to 2**23 + u."""
    n, rows, per_word, width = 16, 2, 8, 4
    codes = torch.randint(0, 16, (rows * per_word, n), generator=torch.Generator().manual_seed(0))
    words = torch.zeros(rows, n, dtype=torch.int64)
    for j in range(per_word):
        words |= codes[j::per_word] << (j * width)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(DEVICE)
    out = torch.empty(rows * per_word, n, device=DEVICE)
    _expand_words[(1,)](words, out, N=n, ROWS=rows, PER_WORD=per_word, WIDTH=width)
    assert torch.equal(out.cpu(), codes.float())


@triton.jit
def _arrive(part_ptr, count_ptr, total_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(part_ptr + tl.program_id(0) * N + offs, offs.to(tl.float32) + tl.program_id(0), cache_modifier=".cg")
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + offs, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    last = arrived == tl.num_programs(0) - 1
    total = tl.zeros((N,), dtype=tl.float32)
    for split in range(tl.num_programs(0)):
        total += tl.load(part_ptr + split * N + offs, mask=last, other=0.0, cache_modifier=".cg")
    tl.store(total_ptr + offs, total, mask=last)
    tl.store(count_ptr + offs, tl.zeros((N,), dtype=tl.int32), mask=last)


def test_atomic_add_returns_the_old_value_so_the_last_arrival_reduces():
    """The serial split-K: atomics return what was there before, .cg loads/stores and barriers are accepted."""
    n, programs = 16, 5
    part = torch.empty(programs, n, device=DEVICE)
    counts = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    total = torch.full((n,), -1.0, device=DEVICE)
    _arrive[(programs,)](part, counts, total, N=n)
    assert torch.equal(total.cpu(), programs * torch.arange(n).float() + sum(range(programs)))
    assert int(counts.abs().sum()) == 0


@triton.jit
def _gather_rows(table_ptr, index_ptr, out_ptr, N: tl.constexpr, E: tl.constexpr, K: tl.constexpr):
    offs_n = tl.arange(0, N)
    table = tl.load(table_ptr + offs_n[:, None] * E + tl.arange(0, E)[None, :])
    index = tl.load(index_ptr + tl.arange(0, K)[:, None] * N + offs_n[None, :])  # [K, N]
    tl.store(out_ptr + tl.arange(0, K)[:, None] * N + offs_n[None, :], tl.trans(tl.gather(table, tl.trans(index), 1)))


def test_gather_from_a_register_table():
    n, entries, k = 16, 16, 32
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(n, entries, generator=generator)
    index = torch.randint(0, entries, (k, n), generator=generator, dtype=torch.int32)
    out = torch.empty(k, n, device=DEVICE)
    _gather_rows[(1,)](table.to(DEVICE), index.to(DEVICE), out, N=n, E=entries, K=k)
    assert torch.equal(out.cpu(), table.gather(1, index.t().long()).t())
