"""The value types the kernels consume: LUTWeight, SparseOutliers, DenseAndSparseWeight."""

import pytest
import torch

from compressor.modules.linear import QuantizedLinear
from compressor.weights.values import (
    BFPWeight,
    DenseAndSparseWeight,
    LUTWeight,
    SparseOutliers,
)


def test_every_kind_a_codec_stores_survives_its_checkpoint_round_trip(weights):
    """Every value kind that ``auto`` exports has exactly one layout in its format, and reads back bit-exactly."""
    from compressor.export import native
    from compressor.export.codecs import codec_for

    values = [
        weights.uniform(6, 96, 3, symmetric=True, device="cpu"),
        weights.uniform(6, 96, 5, symmetric=False, device="cpu"),
        weights.lut(6, 96, 4, device="cpu"),
        DenseAndSparseWeight.from_parts(weights.lut(6, 96, 3, device="cpu"), weights.outliers(6, 96, device="cpu")),
        BFPWeight.quantize(torch.randn(6, 96), 5, 32),
    ]
    for value in values:
        codec = codec_for(value)
        if codec is native:
            assert sum(layout.stores(value) for layout in native.LAYOUTS.values()) == 1
        config = codec.quantization_config({"layer": codec.module_entry(value)}, [])
        back = codec.read_module(codec.to_tensors(value, torch.float16), config, "layer", torch.float16)
        assert type(back) is type(value) and back.kind == value.kind
        assert torch.equal(back.dequantize(torch.float32), value.dequantize(torch.float32)), value.kind
    assert codec_for(weights.outliers(6, 96, device="cpu")) is None  # outliers alone: no checkpoint format


def test_lut_weight(weights):
    weight = weights.lut(6, 96, 3, device="cpu")
    dense = weight.dequantize(torch.float32)
    assert dense.shape == weight.shape == (6, 96)
    for n, k in ((0, 0), (5, 95), (3, 17)):
        assert dense[n, k] == weight.lut[n, int(weight.codes[n, k])].float()
    assert weight.dequantize().dtype == torch.float16
    assert weight.bits_per_weight() == pytest.approx(3 + 16 * 8 / 96)  # the fp16 codebook, per weight


def test_sparse_outliers_round_trip_and_cost():
    dense = torch.zeros(4, 50)
    dense[0, 3], dense[0, 49], dense[2, 7], dense[3, 0] = 1.5, -2.0, 3.25, 0.5
    outliers = SparseOutliers.from_dense(dense)
    assert outliers.crow.tolist() == [0, 2, 2, 3, 4] and outliers.col.tolist() == [3, 49, 7, 0]
    assert outliers.crow.dtype == outliers.col.dtype == torch.int32
    assert torch.equal(outliers.dequantize(), dense) and outliers.shape == (4, 50) and outliers.nnz == 4
    # SqueezeLLM's accounting: 16-bit value + 32-bit column per entry, 32-bit row pointers
    assert outliers.bits_per_weight() == pytest.approx((4 * 48 + 32 * 5) / 200)
    with pytest.raises(ValueError, match="crow"):
        SparseOutliers(crow=outliers.crow[:-1], col=outliers.col, val=outliers.val, shape=(4, 50))


def test_dense_and_sparse(weights):
    base = weights.uniform(8, 64, 3, 32, symmetric=False, device="cpu")
    outliers = weights.outliers(8, 64, device="cpu")
    weight = DenseAndSparseWeight.from_parts(base, outliers)
    assert weight.base_kind == "uniform" and weight.shape == (8, 64)
    assert torch.equal(
        weight.dequantize(torch.float32), base.dequantize(torch.float32) + outliers.dequantize(torch.float32)
    )
    assert weight.bits_per_weight() == pytest.approx(base.bits_per_weight() + outliers.bits_per_weight())
    assert torch.equal(weight.base.dequantize(), base.dequantize()) and torch.equal(weight.outliers.val, outliers.val)
    lut_weight = DenseAndSparseWeight.from_parts(weights.lut(8, 64, 4, device="cpu"), outliers)
    assert lut_weight.base_kind == "lut" and isinstance(lut_weight.base, LUTWeight)
    with pytest.raises(ValueError, match="exactly one"):
        DenseAndSparseWeight(
            codes=base.codes, outlier_crow=outliers.crow, outlier_col=outliers.col, outlier_val=outliers.val
        )
    with pytest.raises(ValueError, match="shape"):
        DenseAndSparseWeight.from_parts(weights.uniform(8, 32, 3, 32, device="cpu"), outliers)
    with pytest.raises(TypeError):
        DenseAndSparseWeight.from_parts(outliers, outliers)


def test_quantized_linear_holds_every_tensor_of_the_flat_fields_as_buffers(weights):
    weight = DenseAndSparseWeight.from_parts(weights.lut(8, 64, 4, device="cpu"), weights.outliers(8, 64, device="cpu"))
    module = QuantizedLinear(weight)
    assert set(module.state_dict()) == {"codes", "outlier_crow", "outlier_col", "outlier_val", "lut"}
    moved = module.to(torch.float32)  # floating buffers follow .to(); codes and indices keep their dtype
    rebuilt = moved.quantized_weight
    assert rebuilt.lut.dtype == torch.float32 and rebuilt.outlier_val.dtype == torch.float32
    assert rebuilt.codes.dtype == torch.uint8 and rebuilt.outlier_col.dtype == torch.int32
    torch.testing.assert_close(rebuilt.dequantize(torch.float32), weight.dequantize(torch.float32))
    assert "dense_and_sparse" in repr(module)
