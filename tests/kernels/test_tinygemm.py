"""torch's int4 tinygemm as a schedule for 4-bit group weights (on a CPU: torch's CPU twins of the ops)."""

import pytest
import torch
from kernel_helpers import assert_matches

from compressor.kernels import triton_linear
from compressor.kernels.packing import pack_uniform
from compressor.kernels.reference import exact_linear
from compressor.kernels.tables import KernelConfig
from compressor.kernels.tinygemm import supported, tinygemm_linear
from compressor.weights.values import DenseAndSparseWeight

N, K = 48, 256


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [64, 128])
def test_tinygemm_computes_our_4bit_weights(weights, symmetric, group):
    weight = weights.uniform(N, K, 4, group, symmetric, scale_dtype=torch.float32)
    x, bias = weights.x(3, K, torch.bfloat16), weights.bias(N, torch.bfloat16)
    y = tinygemm_linear(x, pack_uniform(weight), bias)
    assert_matches(y, exact_linear(x, weight, bias), torch.bfloat16)


def test_the_dispatcher_runs_tinygemm_only_where_it_serves_the_weight(weights):
    config = KernelConfig("tinygemm")
    x = weights.x(2, K, torch.float16)
    four = weights.uniform(N, K, 4, 64, symmetric=False)
    assert supported(pack_uniform(four), x)
    y = triton_linear(x, four, None, config)
    assert (
        y.dtype == torch.float16
        and (y.float() - exact_linear(x, four)).abs().max() / exact_linear(x, four).abs().max() < 1e-2
    )
    for other in (
        weights.uniform(N, K, 3, 64),
        weights.uniform(N, K, 4, 48),  # width, group it does not serve
        DenseAndSparseWeight.from_parts(four, weights.outliers(N, K)),
    ):  # outliers: our kernels
        assert_matches(triton_linear(x, other, None, config), exact_linear(x, other), torch.float16)
    assert not supported(pack_uniform(weights.uniform(N, 200, 4, 64)), x)  # K not a multiple of 128
