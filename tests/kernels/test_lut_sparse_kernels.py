"""LUT kernels, the sparse outlier kernel, and dense-and-sparse weights against the fp32 reference."""

import pytest
import torch
from kernel_helpers import assert_matches, rel_error

from compressor.kernels.lut import lut_dequantize, lut_linear
from compressor.kernels.packing import pack_lut, pack_outliers, pack_uniform
from compressor.kernels.reference import exact_linear, lut_reference, outlier_reference
from compressor.kernels.sparse import outlier_add, outlier_linear
from compressor.kernels.tables import KernelConfig
from compressor.kernels.uniform import uniform_linear
from compressor.weights.values import DenseAndSparseWeight, SparseOutliers

N, K = 37, 200
SCHEDULES = [
    (1, KernelConfig("decode", block_m=1, block_n=32, block_k=64, split_k=2), torch.float32),
    (2, KernelConfig("decode", block_m=2, block_n=16, block_k=32, split_k=3, lut="registers"), torch.float32),
    (9, KernelConfig("decode", block_m=16, block_n=32, block_k=64, split_k=2, lut="registers"), torch.float16),
    (3, KernelConfig("gemm", block_m=16, block_n=64, block_k=64, split_k=2), torch.float16),
    (17, KernelConfig("gemm", block_m=32, block_n=64, block_k=128, split_k=1, lut="registers"), torch.bfloat16),
    (5, KernelConfig("dequant", block_n=64, block_k=64), torch.float32),
]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_lut_every_schedule(weights, bits):
    """Per-row codebooks of 2**bits entries, gathered from global memory or from registers."""
    weight = weights.lut(N, K, bits)
    packed = pack_lut(weight)
    for m, config, dtype in SCHEDULES:
        x, bias = weights.x(m, K, dtype), weights.bias(N, dtype)
        assert_matches(
            lut_linear(x, packed, bias, config), exact_linear(x, weight, bias), dtype, f"{config.schedule} M={m}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lut_with_a_low_precision_codebook_and_activations(weights, dtype):
    weight = weights.lut(N, K, 4, lut_dtype=dtype)
    packed = pack_lut(weight)
    x = weights.x(3, K, dtype)
    assert rel_error(lut_reference(x, packed), exact_linear(x, weight)) < 1e-6
    for config in (SCHEDULES[2][1], SCHEDULES[3][1]):  # registers (decode, tl.dot) and global (gemm)
        assert_matches(lut_linear(x, packed, None, config), exact_linear(x, weight), dtype, config.lut)


def test_lut_dequantize_kernel_is_exact(weights):
    weight = weights.lut(N, K, 3, lut_dtype=torch.float32)
    for mode in ("global", "registers"):
        config = KernelConfig("dequant", block_n=16, block_k=64, lut=mode)
        assert torch.equal(lut_dequantize(pack_lut(weight), torch.float32, config), weight.dequantize(torch.float32)), (
            mode
        )


@pytest.mark.parametrize("m", [1, 17])  # 17 > 16 rows per program: two row chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outlier_kernel_alone(weights, m, dtype):
    """More entries than one block (several programs), duplicate rows in a block, an empty row."""
    outliers = weights.outliers(N, K, value_dtype=dtype if dtype != torch.float32 else torch.float16)
    packed = pack_outliers(outliers)
    assert packed.nnz > 64 and len(set(packed.rows[:64].tolist())) < 64
    x = weights.x(m, K, dtype)
    ws = torch.full((m, N), 0.5, device=x.device)  # adds to what is already there
    outlier_add(x, packed, ws, block=64)
    torch.testing.assert_close(ws, outlier_reference(x, packed) + 0.5, rtol=1e-5, atol=1e-5)
    bias = weights.bias(N, dtype)
    assert_matches(outlier_linear(x, packed, bias), exact_linear(x, outliers, bias), dtype)


def test_outliers_alone_at_prefill_size_and_without_entries(weights):
    outliers = weights.outliers(N, K)
    x = weights.x(1030, K, torch.float32)
    assert_matches(outlier_linear(x, pack_outliers(outliers)), exact_linear(x, outliers), torch.float32)
    empty = SparseOutliers.from_dense(torch.zeros(N, K, device=x.device))
    assert empty.nnz == 0
    assert torch.equal(outlier_linear(x[:3], pack_outliers(empty)), torch.zeros(3, N, device=x.device))


@pytest.mark.parametrize("base_kind", ["uniform", "lut"])
def test_dense_and_sparse_every_schedule(weights, base_kind):
    """The outliers go through the fp32 workspace after the dense kernel: with split-K, with
    SPLIT_K = 1 (which then accumulates instead of storing), and scattered on the dequantize path."""
    base = weights.uniform(N, K, 3, 64, symmetric=False) if base_kind == "uniform" else weights.lut(N, K, 3)
    weight = DenseAndSparseWeight.from_parts(base, weights.outliers(N, K))
    dense = pack_uniform(base) if base_kind == "uniform" else pack_lut(base)
    linear = uniform_linear if base_kind == "uniform" else lut_linear
    outliers = pack_outliers(weight.outliers)
    for m, config, dtype in SCHEDULES:
        x, bias = weights.x(m, K, dtype), weights.bias(N, dtype)
        assert_matches(
            linear(x, dense, bias, config, outliers), exact_linear(x, weight, bias), dtype, f"{config.schedule} M={m}"
        )
