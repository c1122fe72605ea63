"""The layouts that the instruction counts pick (benchmarks/kernel_sass.py), against the fp32 reference.

* 3-bit uniform codes in the "tens" kernel layout (32 codes in three words, ten per word plus two
  split codes), decoded at M <= 4 by one AND and one FMA per field on denormal fp32 fields
  (``codes.tens_products``), and by every other schedule through ``codes.load_tens_codes``;
* 2-, 4- and 8-bit uniform codes (planes layout) decoded the same way (``codes.plane_products``),
  and the mantissa decode they replaced (``fields=False``);
* codebooks (2/4/8-bit) through the code-major table at decode (``codes.codebook_products``);
* dense-and-sparse decode in one launch.

Awkward shapes: N = 37, K = 200 (a tail of 8 codes in the last block) and K = 33.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DEVICE, Weights, assert_matches

from compressor.kernels.lut import lut_linear
from compressor.kernels.packing import (
    codebook_table,
    pack_codes,
    pack_lut,
    pack_outliers,
    pack_tens,
    pack_uniform,
    unpack_kernel_codes,
    unpack_tens,
)
from compressor.kernels.reference import exact_linear
from compressor.kernels.tables import KernelConfig
from compressor.kernels.uniform import uniform_dequantize, uniform_linear

N = 37


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 130), seed=st.integers(0, 999))
def test_tens_round_trip_over_random_shapes(n, k, seed):
    codes = Weights(seed).codes(n, k, 3)
    packed = pack_tens(codes)
    assert packed.shape == (-(-k // 32) * 3, n) and packed.dtype == torch.int32  # exactly 3 bits per weight
    assert torch.equal(unpack_tens(packed, (n, k)), codes)


def test_tens_bit_positions():
    """Code 10 r + j at bits 3 j of word r; code 30 = a[30:32] | b[30] << 2, code 31 = b[31] | c[30:32] << 1."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 12], codes[0, 30], codes[0, 31] = 5, 6, 7
    a, b, c = (int(w) & 0xFFFFFFFF for w in pack_tens(codes)[:, 0])
    assert a == 2 << 30 and b == (5 << 6) | (1 << 30) | (1 << 31) and c == 3 << 30


def test_uniform_3bit_kernel_tensors_use_tens_and_exports_keep_the_planes():
    weight = Weights().uniform(N, 200, 3, 64, device="cpu")
    packed = pack_uniform(weight)
    assert packed.layout == "tens" and torch.equal(packed.packed, pack_tens(weight.codes))
    assert torch.equal(unpack_kernel_codes(packed.packed, 3, weight.shape, packed.layout), weight.codes)
    assert pack_uniform(Weights().uniform(N, 200, 4, 64, device="cpu")).layout == "planes"
    from compressor.export.layouts.uniform import LAYOUT  # the native checkpoint keeps the planes

    assert torch.equal(LAYOUT.tensors(weight)["weight_packed"], pack_codes(weight.codes, 3).t())


ROWS = [  # (M, config): the fast path at M = 1, 2 and 4, split-K, unrolled tiles, a 64-deep tile
    (1, KernelConfig("decode", block_m=1, block_n=32, block_k=32, split_k=3, num_warps=1)),
    (2, KernelConfig("decode", block_m=2, block_n=16, block_k=64, split_k=2, unroll=2)),
    (4, KernelConfig("decode", block_m=4, block_n=64, block_k=32, split_k=1, unroll=4)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("symmetric,group,k", [(True, 128, 200), (False, 32, 200), (True, -1, 33), (False, 64, 96)])
def test_tens_decode_matches_reference(dtype, symmetric, group, k):
    weights = Weights(k)
    weight = weights.uniform(N, k, 3, group, symmetric, scale_dtype=dtype)
    packed = pack_uniform(weight)
    for m, config in ROWS:
        x, bias = weights.x(m, k, dtype), weights.bias(N, dtype)
        assert_matches(uniform_linear(x, packed, bias, config), exact_linear(x, weight, bias), dtype, f"M={m}")


def test_tens_decode_keeps_extreme_activations_exact_in_range():
    """fp16: every value is in range (the largest, 65504, and subnormals); bf16/fp32 up to 2**40."""
    weights = Weights(3)
    weight = weights.uniform(N, 96, 3, 32, symmetric=False, scale_dtype=torch.float32)
    weight = replace(weight, scales=weight.scales / 64)  # y stays inside fp16's range
    packed = pack_uniform(weight)
    config = ROWS[0][1]
    for dtype, big, small in ((torch.float16, 65504.0, 2.0**-24), (torch.bfloat16, 2.0**40, 2.0**-60)):
        x = weights.x(1, 96, torch.float32)
        x[0, 31:33] = big  # codes 31 (a split code) and 32
        x[0, 1::3] = -small
        x = x.to(dtype)
        y = uniform_linear(x, packed, None, config)
        assert torch.isfinite(y).all()
        assert_matches(y, exact_linear(x, weight), dtype, f"{dtype} extremes")


@pytest.mark.parametrize("config", [KernelConfig("gemm", 16, 32, 64, split_k=2), KernelConfig("dequant", 16, 32, 32)])
def test_tens_through_the_other_schedules(config):
    weights = Weights(5)
    weight = weights.uniform(N, 200, 3, 48, symmetric=False)  # groups straddle blocks: the general decode too
    packed = pack_uniform(weight)
    x = weights.x(19, 200, torch.float16)
    assert_matches(uniform_linear(x, packed, None, config), exact_linear(x, weight), torch.float16, config.schedule)
    general = KernelConfig("decode", block_m=4, block_n=32, block_k=32, split_k=2)
    assert_matches(uniform_linear(x[:3], packed, None, general), exact_linear(x[:3], weight), torch.float16, "g48")
    assert torch.equal(uniform_dequantize(packed, torch.float32), weight.dequantize(torch.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_field_decode_of_power_of_two_widths_matches_reference(bits, dtype):
    weights = Weights(bits)
    for symmetric, group in ((True, 64), (False, -1)):
        weight = weights.uniform(N, 72, bits, group, symmetric, scale_dtype=dtype)
        packed = pack_uniform(weight)
        for m, config in ((1, ROWS[0][1]), (4, ROWS[2][1])):
            x, bias = weights.x(m, 72, dtype), weights.bias(N, dtype)
            expected = exact_linear(x, weight, bias)
            for fields in (True, False):
                y = uniform_linear(x, packed, bias, replace(config, fields=fields))
                assert_matches(y, expected, dtype, f"M={m} fields={fields} group={group}")


@pytest.mark.parametrize("bits,block_k,unroll", [(2, 16, 4), (4, 16, 2), (8, 16, 2), (3, 32, 1), (3, 32, 2)])
def test_field_decode_with_whole_units_loads_x_unmasked(bits, block_k, unroll):
    """K a multiple of the unit (EVEN_K, every Llama shape): x and the code words are loaded with no
    mask, as the heuristic runs it at M = 1 (sixteen columns per thread, ``decode_unroll`` tiles);
    groups of 64 clamp the unit to one group, per-channel scales do not; 3 splits of 4-8 units leave
    one program with fewer (or none)."""
    from compressor.kernels.decode import unit_tiles

    weights = Weights(bits + unroll)
    for symmetric, group in ((True, 128), (False, 64), (True, -1)):
        assert 256 % (block_k * unit_tiles(group, block_k, unroll)) == 0  # the EVEN_K branch runs
        weight = weights.uniform(N, 256, bits, group, symmetric, scale_dtype=torch.float16)
        config = KernelConfig("decode", block_m=1, block_n=32, block_k=block_k, split_k=3, num_warps=1, unroll=unroll)
        for dtype in (torch.float16, torch.bfloat16):
            x, bias = weights.x(1, 256, dtype), weights.bias(N, dtype)
            y = uniform_linear(x, pack_uniform(weight), bias, config)
            assert_matches(y, exact_linear(x, weight, bias), dtype, f"group={group} {dtype}")


def test_codebook_table_is_code_major():
    weight = Weights().lut(N, 64, 4, device="cpu")
    table = codebook_table(weight.lut)
    assert table.shape == (16, 4096) and table.dtype == torch.float32  # rows >= N and >= 2**12
    assert torch.equal(table[:, :N], weight.lut.t().float()) and not table[:, N:].any()
    assert pack_lut(weight).log_np == 12 and pack_lut(Weights().lut(N, 64, 3, device="cpu")).table is None


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codemajor_decode_matches_reference(bits):
    weights = Weights(bits)
    weight = weights.lut(N, 200, bits)
    packed = pack_lut(weight)
    for m, dtype in ((1, torch.float16), (3, torch.float32)):
        config = KernelConfig("decode", block_m=4 if m > 1 else 1, block_n=32, block_k=32, split_k=3, lut="codemajor")
        x, bias = weights.x(m, 200, dtype), weights.bias(N, dtype)
        assert_matches(lut_linear(x, packed, bias, config), exact_linear(x, weight, bias), dtype, f"M={m}")


def test_codemajor_with_outliers_and_as_the_default():
    weights = Weights(9)
    weight = weights.lut(N, 200, 4)
    packed, outliers = pack_lut(weight), pack_outliers(weights.outliers(N, 200))
    x = weights.x(1, 200, torch.float16)
    expected = exact_linear(x, weight) + x.float() @ outliers_dense_t(outliers)
    config = KernelConfig("decode", block_m=1, block_n=32, block_k=32, split_k=2, lut="codemajor")
    assert_matches(lut_linear(x, packed, None, config, outliers), expected, torch.float16, "outliers")
    assert_matches(lut_linear(x, packed), exact_linear(x, weight), torch.float16, "default config")


def test_shared_memory_codebook_mode_off_the_gpu_and_as_the_gpu_default():
    """``lut="shared"`` (the Gluon decode of ``lut_shared.py``) needs a GPU and one row of x: here, in
    the interpreter, and at M > 1 it runs the code-major Triton decode, which computes the same sums
    from the same fp32 table; the heuristic picks it for 4-bit codebooks at M = 1 on a GPU."""
    from compressor.kernels.heuristics import codebook_config, gpu_config
    from compressor.kernels.lut import shared_applies

    weights = Weights(11)
    weight = weights.lut(N, 200, 4)
    packed = pack_lut(weight)
    config = KernelConfig("decode", block_m=1, block_n=1024, block_k=16, split_k=3, num_warps=2, lut="shared")
    for m, dtype in ((1, torch.float16), (1, torch.float32), (3, torch.float16)):
        x, bias = weights.x(m, 200, dtype), weights.bias(N, dtype)
        assert not shared_applies(replace(config, block_m=4 if m > 1 else 1), packed, x, None)
        run = replace(config, block_m=4) if m > 1 else config
        assert_matches(lut_linear(x, packed, bias, run), exact_linear(x, weight, bias), dtype, f"M={m}")
    chosen = codebook_config(gpu_config(1, 4096, 4096, -1, 132, 4), 4)
    assert (chosen.lut, chosen.block_n, chosen.num_warps) == ("shared", 1024, 4)
    assert codebook_config(gpu_config(2, 4096, 4096, -1, 132, 4), 4).lut == "codemajor"


def outliers_dense_t(outliers):
    from compressor.kernels.reference import outliers_dense

    return outliers_dense(outliers).t().to(DEVICE)


@pytest.mark.parametrize("m,block_m,split_k", [(1, 1, 4), (3, 4, 1), (16, 16, 2)])
def test_decode_with_outliers_is_one_launch(monkeypatch, m, block_m, split_k):
    """Dense-and-sparse at decode: the outliers are added inside the decode launch (each split adds its
    share of the N-tile's entries into its own partial before the serial reduction): no outlier kernel,
    no zeroed workspace, no cast; dense rows, empty rows and duplicate columns included."""
    from compressor.kernels import decode, sparse

    weights = Weights(m)
    base = [weights.uniform(N, 72, 3, 32), weights.lut(N, 72, 4)]
    outliers = weights.outliers(N, 72)
    x = weights.x(m, 72, torch.float16)
    bias = weights.bias(N, torch.float16)
    sparse_part = pack_outliers(outliers)
    expected = [exact_linear(x, w, bias) + x.float() @ outliers_dense_t(sparse_part) for w in base]
    config = KernelConfig("decode", block_m=block_m, block_n=16, block_k=32, split_k=split_k, lut="codemajor")
    runs = [(uniform_linear, pack_uniform(base[0])), (lut_linear, pack_lut(base[1]))]
    decode.arrival_counters(x.device, N)
    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(decode, "_decode_kernel", Counting(decode._decode_kernel))
    monkeypatch.setattr(sparse, "_outlier_kernel", None)  # the separate outlier kernel is not used
    monkeypatch.setattr(torch, "zeros", None)
    outputs = [linear(x, dense, bias, config, sparse_part) for linear, dense in runs]
    monkeypatch.undo()
    assert len(launches) == 2
    for y, want in zip(outputs, expected):
        assert_matches(y, want, torch.float16, "dense-and-sparse")
    assert int(decode.arrival_counters(x.device, N).abs().sum()) == 0
