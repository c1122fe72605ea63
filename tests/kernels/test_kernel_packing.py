"""Planes packing: exact round trips, the documented bit layout, and the compressed-tensors repack."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import Weights

from compressor.export.compressed_tensors import repack_compressed_tensors, uniform_to_ct_tensors
from compressor.kernels.packing import (
    pack_codes,
    pack_lut,
    pack_outliers,
    pack_uniform,
    padded_k,
    plane_widths,
    unpack_codes,
    unpack_kernel_codes,
)
from compressor.kernels.reference import (
    dequantize_lut,
    dequantize_uniform,
    outliers_dense,
)

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(bits=st.integers(1, 8), n=st.integers(1, 24), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_is_exact_and_reads_bits_over_8_bytes_per_weight(bits, n, k, seed):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.is_contiguous()
    assert packed.shape == (padded_k(k) * bits // 32, n)  # K-major, N contiguous, no padding bits
    assert packed.numel() * 4 == padded_k(k) * n * bits // 8
    assert torch.equal(unpack_codes(packed, bits, (n, k)), codes)


def test_plane_decomposition():
    assert {b: plane_widths(b) for b in range(1, 9)} == {
        1: [1],
        2: [2],
        3: [2, 1],
        4: [4],
        5: [4, 1],
        6: [4, 2],
        7: [4, 2, 1],
        8: [8],
    }
    with pytest.raises(ValueError):
        plane_widths(9)


def test_three_bit_layout_by_hand():
    """3 = 2+1: the 2-bit plane (bits 1..2 of each code, 16 codes per word) comes first, then the
    1-bit plane (bit 0, 32 codes per word); code k sits at bit (k % per_word) * width, LSB first."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 1], codes[0, 17], codes[0, 31] = 0b101, 0b011, 0b110, 0b111
    packed = pack_codes(codes, 3)
    assert packed.shape == (3, 1)  # 2 words of the 2-bit plane + 1 word of the 1-bit plane
    words = [int(w) & 0xFFFFFFFF for w in packed[:, 0]]
    assert words[0] == (0b10 << 0) | (0b01 << 2)  # codes 0 and 1, high two bits
    assert words[1] == (0b11 << 2) | (0b11 << 30)  # codes 17 and 31 (slots 1 and 15 of word 1)
    assert words[2] == (1 << 0) | (1 << 1) | (0 << 17) | (1 << 31)  # low bits of codes 0, 1, 17, 31


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pow2_widths_are_compressed_tensors_packing_transposed(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = Weights().codes(5, 96, bits)
    ct = pack_to_int32((codes.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_codes(codes, bits), ct.t().contiguous())


def test_pack_rejects_codes_wider_than_bits_and_unpack_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="exceed"):
        pack_codes(torch.full((2, 8), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_codes(torch.zeros(3, 2, dtype=torch.int32), 4, (2, 32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_kernel_tensors_dequantize_exactly_like_the_value_type(symmetric, group_size):
    weight = Weights().uniform(13, 100, 5, group_size, symmetric, scale_dtype=torch.float32, device="cpu")
    packed = pack_uniform(weight)
    assert torch.equal(packed.scales, weight.scales.t())
    if symmetric:
        assert packed.zs is None
        assert torch.equal(dequantize_uniform(packed), weight.dequantize(torch.float32))
    else:
        assert torch.equal(packed.zs, (-weight.zeros.float() * weight.scales).t())
        # u * s + zs (one FMA in the kernel) vs (u - z) * s: equal up to fp32 rounding
        torch.testing.assert_close(dequantize_uniform(packed), weight.dequantize(torch.float32), rtol=0, atol=1e-6)


def test_lut_and_outlier_kernel_tensors():
    w = Weights()
    lut = w.lut(11, 70, 3, device="cpu")
    assert torch.equal(dequantize_lut(pack_lut(lut)), lut.dequantize(torch.float32))
    outliers = w.outliers(11, 70, device="cpu")
    packed = pack_outliers(outliers)
    assert packed.rows.dtype == torch.int32 and packed.nnz == outliers.nnz
    assert torch.equal(outliers_dense(packed), outliers.dequantize(torch.float32))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_repack_reproduces_the_weights_exactly(bits, symmetric):
    """ct tensors -> our planes: same codes, scales and zero shifts, and the same dequantized
    weight as compressed-tensors' own decompression (its reader, its math, fp32 scales)."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group_size = 64 if bits % 2 else -1
    weight = Weights(bits).uniform(37, 192, bits, group_size, symmetric, scale_dtype=torch.float32, device="cpu")
    tensors = uniform_to_ct_tensors(weight, torch.float32)
    packed = repack_compressed_tensors(tensors, bits, group_size)
    assert torch.equal(unpack_kernel_codes(packed.packed, bits, (37, 192), packed.layout), weight.codes)
    assert torch.equal(packed.scales, weight.scales.t())

    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=bits, symmetric=symmetric, **strategy)
    )
    state = dict(tensors)
    if not symmetric:  # compressed-tensors' decompressor expects its own zero point tensor name and layout
        state["weight_zero_point"] = tensors["weight_zero_point"]
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    ours = dequantize_uniform(packed)
    # symmetric: bit-identical; asymmetric: u * s + zs (the kernel's FMA form) vs (q - z) * s differ
    # by fp32 rounding of the larger term only
    bound = 0 if symmetric else 4 * torch.finfo(torch.float32).eps * (2**bits * weight.scales.abs().max()).item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=bound)


@HYPOTHESIS
@given(
    bits=st.integers(2, 8),
    n=st.integers(1, 20),
    k=st.integers(1, 160),
    symmetric=st.booleans(),
    seed=st.integers(0, 999),
)
def test_compressed_tensors_repack_round_trips_over_random_shapes(bits, n, k, symmetric, seed):
    weight = Weights(seed).uniform(n, k, bits, -1, symmetric, device="cpu")
    packed = repack_compressed_tensors(uniform_to_ct_tensors(weight, torch.float16), bits, -1)
    assert torch.equal(unpack_kernel_codes(packed.packed, bits, (n, k), packed.layout), weight.codes)
    if not symmetric:
        assert torch.equal(packed.zs, (-weight.zeros.float() * weight.scales.float()).t())
