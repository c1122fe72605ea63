"""Uniform kernels (gemv, split-K gemm, tiled gemm, dequantize) against the fp32 reference.

Every width 1..8, symmetric and asymmetric, on N = 37 (odd, not a multiple of any block) and
K = 200 (a multiple of neither 32, 64, 128 nor the group 48), M = 1, 3, 17 and a dequantize-path M.
"""

import pytest
import torch
from kernel_helpers import TOLERANCE, assert_matches, rel_error

from compressor.kernels.heuristics import default_config, schedule_for
from compressor.kernels.packing import pack_uniform
from compressor.kernels.reference import exact_linear, uniform_reference
from compressor.kernels.tables import KernelConfig
from compressor.kernels.uniform import uniform_dequantize, uniform_linear

N, K = 37, 200
GROUPS = [32, 64, -1, 48, 128]  # 48: groups straddle blocks and words; -1: per channel

SCHEDULES = [  # (M, config, dtype): each runs a different path through the kernels
    (
        1,
        KernelConfig("decode", block_m=1, block_n=32, block_k=64, split_k=2),
        torch.float32,
    ),  # serial split-K, 2 N-tiles
    (
        3,
        KernelConfig("decode", block_m=4, block_n=16, block_k=32, split_k=3),
        torch.float16,
    ),  # CUDA-core rows, 3 splits
    (9, KernelConfig("decode", block_m=16, block_n=32, block_k=64, split_k=1), torch.float32),  # tl.dot, direct store
    (3, KernelConfig("gemm", block_m=16, block_n=64, block_k=32, split_k=3), torch.float16),  # split-K tl.dot, atomics
    (17, KernelConfig("gemm", block_m=16, block_n=32, block_k=128, split_k=1), torch.float32),  # tiled, 2 M-tiles
    (5, KernelConfig("dequant", block_n=32, block_k=64), torch.float16),  # dequantize + cuBLAS
]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_and_schedule_matches_reference(weights, bits, symmetric):
    """fp32 activations (tolerance 1e-5: one wrong code is caught) on three schedules, fp16 on three."""
    group = GROUPS[(bits + symmetric) % len(GROUPS)]
    weight = weights.uniform(N, K, bits, group, symmetric)
    packed = pack_uniform(weight)
    for m, config, dtype in SCHEDULES:
        x, bias = weights.x(m, K, dtype), weights.bias(N, dtype)
        y = uniform_linear(x, packed, bias, config)
        assert_matches(y, exact_linear(x, weight, bias), dtype, f"{config.schedule} M={m} group={group}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bits,symmetric,group", [(2, False, 64), (3, True, 32), (7, True, 48), (8, False, 128)])
def test_every_schedule_in_every_activation_dtype(weights, dtype, bits, symmetric, group):
    """bf16 / fp16 / fp32 activations with scales of the same dtype (bf16 is upcast after tl.load)."""
    weight = weights.uniform(N, K, bits, group, symmetric, scale_dtype=dtype)
    packed = pack_uniform(weight)
    for m, config, _ in SCHEDULES:
        x = weights.x(m, K, dtype)
        bias = weights.bias(N, dtype) if config.schedule != "gemm" else None
        assert_matches(
            uniform_linear(x, packed, bias, config), exact_linear(x, weight, bias), dtype, f"{config.schedule} M={m}"
        )


def test_kernels_agree_with_the_reference_on_the_packed_tensors(weights):
    """The torch reference that decodes the kernel layout (not the value type) agrees too."""
    weight = weights.uniform(N, K, 6, 48, symmetric=False, scale_dtype=torch.float32)
    packed = pack_uniform(weight)
    x = weights.x(3, K, torch.float32)
    expected = uniform_reference(x, packed)
    assert rel_error(expected, exact_linear(x, weight)) < 1e-6
    assert_matches(uniform_linear(x, packed, None, SCHEDULES[3][1]), expected, torch.float32)


@pytest.mark.parametrize("bits", [1, 7])
def test_one_word_tiles_and_scale_tiles(weights, bits):
    """BLOCK_K = 32, one word of the 1-bit plane per tile, K = 200 ends mid-word; group 64 > BLOCK_K
    and group 8 < BLOCK_K exercise the one-scale-row and the scale-tile loads."""
    for group in (64, 8):
        weight = weights.uniform(N, K, bits, group, symmetric=group == 8)
        x = weights.x(1, K, torch.float32)
        config = KernelConfig("decode", block_m=1, block_n=64, block_k=32, split_k=4)
        assert_matches(
            uniform_linear(x, pack_uniform(weight), None, config),
            exact_linear(x, weight),
            torch.float32,
            f"group={group}",
        )


def test_non_contiguous_activations(weights):
    weight = weights.uniform(N, K, 4, 64, symmetric=False)
    packed = pack_uniform(weight)
    x = weights.x(K, 17, torch.float16).t()  # [17, K] with strides (1, 17)
    assert not x.is_contiguous()
    for m, config, _ in SCHEDULES[1:5]:
        assert_matches(
            uniform_linear(x[:m], packed, None, config), exact_linear(x[:m], weight), torch.float16, config.schedule
        )


def test_default_configs_run_every_schedule(weights):
    weight = weights.uniform(N, K, 3, 32, symmetric=True)
    packed = pack_uniform(weight)
    for m in (1, 3, 16, 17, 1030):
        x = weights.x(m, K, torch.float16)
        assert default_config(m, N, K, 32, x.device).schedule == schedule_for(m)
        assert_matches(uniform_linear(x, packed), exact_linear(x, weight), torch.float16, f"M={m}")


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_kernel_is_exact_in_fp32(weights, symmetric):
    weight = weights.uniform(N, K, 5, 48, symmetric, scale_dtype=torch.float32)
    dense = uniform_dequantize(pack_uniform(weight), torch.float32, KernelConfig("dequant", block_n=16, block_k=32))
    torch.testing.assert_close(dense, weight.dequantize(torch.float32), rtol=0, atol=0 if symmetric else 1e-6)


def test_one_wrong_code_is_far_outside_the_fp32_tolerance(weights):
    """Guard on the tolerance: flipping the low bit of a single code moves the fp32 result by
    orders of magnitude more than the fp32 tolerance allows."""
    weight = weights.uniform(N, K, 4, 32)
    x = weights.x(3, K, torch.float32)
    wrong = weight.codes.clone()
    wrong[5, 7] ^= 1
    broken = type(weight)(codes=wrong, scales=weight.scales, zeros=None, bits=4, group_size=32)
    y = uniform_linear(x, pack_uniform(broken), None, SCHEDULES[3][1])
    assert rel_error(y, exact_linear(x, weight)) > 100 * TOLERANCE[torch.float32]


def test_shape_mismatch_is_an_error(weights):
    packed = pack_uniform(weights.uniform(N, K, 4, 32))
    with pytest.raises(ValueError, match="features"):
        uniform_linear(weights.x(2, K + 1, torch.float16), packed)


class CountingLaunches:
    """Stands in for a Triton kernel object and counts its launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(self.kernel)
        return self.kernel[grid]


@pytest.mark.parametrize("m,block_m", [(1, 1), (3, 4), (16, 16)])
def test_decode_is_one_launch_without_zero_fill_or_cast(weights, monkeypatch, m, block_m):
    """Serial split-K: one kernel writes x's dtype; no zeroed workspace, no cast; the arrival
    counters are back at zero afterwards, so the next call (another layer, same N) is right too."""
    from compressor.kernels import decode, dequant, gemm

    config = KernelConfig("decode", block_m=block_m, block_n=16, block_k=32, split_k=4)
    x = weights.x(m, K, torch.float16)
    layers = [weights.uniform(N, K, bits, 64, symmetric=bits == 3) for bits in (3, 4)]
    biases = [weights.bias(N, torch.float16) for _ in layers]
    cases = [(pack_uniform(w), b, exact_linear(x, w, b)) for w, b in zip(layers, biases)]
    decode.arrival_counters(x.device, N)  # created (zeroed) once, before the calls we watch
    launches = []
    for module, name in ((decode, "_decode_kernel"), (gemm, "_gemm_kernel"), (dequant, "_dequant_kernel")):
        monkeypatch.setattr(module, name, CountingLaunches(getattr(module, name), launches))
    monkeypatch.setattr(torch, "zeros", None)  # any zero-filled workspace would fail here
    outputs = [uniform_linear(x, packed, bias, config) for packed, bias, _ in cases]
    monkeypatch.undo()
    assert len(launches) == len(layers)
    for y, (_, _, expected) in zip(outputs, cases):
        assert_matches(y, expected, torch.float16)
    assert int(decode.arrival_counters(x.device, N).abs().sum()) == 0


def test_decode_takes_all_rows_in_one_program(weights):
    packed = pack_uniform(weights.uniform(N, K, 4, 64))
    with pytest.raises(ValueError, match="block_m"):
        uniform_linear(weights.x(5, K, torch.float16), packed, None, KernelConfig("decode", block_m=4, block_k=32))


def test_configs_reject_tiles_that_split_a_packed_word(weights):
    """A K-tile holds whole words of every plane: 8 codes suffice for 4-bit, 32 for odd widths."""
    from compressor.kernels.heuristics import min_block_k

    assert [min_block_k(b) for b in range(1, 9)] == [32, 16, 32, 8, 32, 16, 32, 4]
    x = weights.x(1, K, torch.float32)
    four, three = (weights.uniform(N, K, b, 64) for b in (4, 3))
    config = KernelConfig("decode", block_m=1, block_n=32, block_k=16, split_k=2)
    assert_matches(
        uniform_linear(x, pack_uniform(four), None, config), exact_linear(x, four), torch.float32, "4-bit, 16-deep"
    )
    with pytest.raises(ValueError, match="splits a packed word"):
        uniform_linear(x, pack_uniform(three), None, config)
    with pytest.raises(ValueError, match="block_k"):
        KernelConfig("decode", block_m=1, block_k=8)
    with pytest.raises(ValueError, match="lut"):
        KernelConfig("decode", block_m=1, lut="texture")  # not a mode ("shared" is one since issue 31)


@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize(
    "bits,symmetric,group", [(4, True, 32), (3, False, 64), (2, True, -1), (8, False, 128), (5, True, 16)]
)
def test_decode_unrolled_reduction_across_groups_splits_and_the_k_tail(weights, unroll, bits, symmetric, group):
    """The CUDA-core uniform decode accumulates `unroll` tiles between reductions and gives each
    program whole units of one group: K = 200 ends mid-tile, 3 splits, groups shorter and longer
    than a unit, per channel; fp32 activations (1e-5)."""
    weight = weights.uniform(N, K, bits, group, symmetric, scale_dtype=torch.float32)
    block_k = 32 if bits % 2 else 16  # 5-bit at group 16: tiles straddle groups, the per-weight path
    for m in (1, 2):
        x, bias = weights.x(m, K, torch.float32), weights.bias(N, torch.float32)
        config = KernelConfig("decode", block_m=m, block_n=16, block_k=block_k, split_k=3, unroll=unroll)
        assert_matches(
            uniform_linear(x, pack_uniform(weight), bias, config),
            exact_linear(x, weight, bias),
            torch.float32,
            f"unroll {unroll} M={m}",
        )
