"""RTN and the shared uniform math: properties that fail when the rounding or the grid is wrong."""

import pytest
import torch

from compressor.quant.uniform import quantize_uniform, relative_error
from compressor.weights.values import UniformWeight


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_error_falls_as_bits_rise(symmetric, group_size):
    weight = torch.randn(48, 200, generator=torch.Generator().manual_seed(0))
    errors = [
        relative_error(weight, quantize_uniform(weight, b, group_size, symmetric, torch.float32)) for b in range(2, 9)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_on_the_grid_are_exact_asymmetric(bits, scale_dtype):
    """Weights built as (u - z) * s, with each group spanning the full code range, come back bit-exact."""
    generator = torch.Generator().manual_seed(bits)
    n, k, g = 16, 96, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=generator)
    codes[:, ::g] = 0  # every group holds both extreme codes, so min-max finds the same grid
    codes[:, 1::g] = 2**bits - 1
    zeros = torch.randint(1, 2**bits - 1, (n, k // g), generator=generator)
    scales = 2.0 ** torch.randint(-8, -2, (n, k // g), generator=generator).float()  # exact in every dtype
    weight = UniformWeight(codes.to(torch.uint8), scales, zeros.to(torch.int32), bits, g).dequantize(torch.float32)
    quantized = quantize_uniform(weight, bits, g, symmetric=False, scale_dtype=scale_dtype)
    assert torch.equal(quantized.dequantize(torch.float32), weight)
    assert torch.equal(quantized.codes, codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_rounding_error_is_at_most_half_a_step(bits):
    """Every weight lands within s/2 of its value, except above the top code (2^(b-1) - 1) * s."""
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(bits))
    q = quantize_uniform(weight, bits, 32, symmetric=True, scale_dtype=torch.float32)
    step = q.scales.repeat_interleave(32, 1)
    error = (weight - q.dequantize(torch.float32)).abs()
    inside = weight <= (2 ** (bits - 1) - 1) * step
    assert (error[inside] <= step[inside] / 2 * (1 + 1e-5)).all()
    assert (~inside).any() or bits == 8


def test_codes_stay_in_range_and_zero_group_is_safe():
    weight = torch.randn(4, 70)
    weight[0] = 0  # an all-zero row: tiny scale, no NaN
    for bits in range(2, 9):
        for symmetric in (True, False):
            q = quantize_uniform(weight, bits, 32, symmetric, torch.float16)
            assert int(q.codes.max()) < 2**bits
            assert q.scales.shape == (4, 3)  # ceil(70 / 32) groups
            assert torch.isfinite(q.dequantize(torch.float32)).all()
            assert torch.equal(q.dequantize(torch.float32)[0], torch.zeros(70))


def test_bits_per_weight_counts_scales_and_zeros():
    weight = torch.randn(64, 256)
    assert quantize_uniform(weight, 4, 128, True, torch.float16).bits_per_weight() == pytest.approx(4 + 16 / 128)
    assert quantize_uniform(weight, 4, 128, False, torch.float16).bits_per_weight() == pytest.approx(4 + (16 + 4) / 128)
    assert quantize_uniform(weight, 3, -1, True, torch.float16).bits_per_weight() == pytest.approx(3 + 16 / 256)


def test_chunked_quantization_equals_whole_matrix(monkeypatch):
    import compressor.weights.values as formats

    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(5))
    whole = quantize_uniform(weight, 3, 32, False, torch.float16)
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a chunk, the last one short
    chunked = quantize_uniform(weight, 3, 32, False, torch.float16)
    assert (
        torch.equal(whole.codes, chunked.codes)
        and torch.equal(whole.scales, chunked.scales)
        and torch.equal(whole.zeros, chunked.zeros)
    )
    full_error = float((weight - whole.dequantize(torch.float32)).norm() / weight.norm())
    assert relative_error(weight, chunked) == pytest.approx(full_error, rel=1e-5)
