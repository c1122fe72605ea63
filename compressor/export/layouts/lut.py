"""Lookup-table weights (SqueezeLLM), with optional sparse full-precision outliers, in the native format.

Per module ``P`` (N outputs, K inputs, b bits, K_pad = K rounded up to 32; spec: ``export/FORMATS.md``,
"Lookup-table weights"):

* ``P.weight_packed``  int32 [N, K_pad * b / 32]: the codes in the kernels' planes layout, transposed
  to [N, .] so that a row-parallel shard is a slice;
* ``P.weight_lut``     [N, 2**b]: each row's codebook, in the dtype the quantizer stored it in;
* ``P.weight_shape``   int64 [2] = (N, K);
* with outliers: ``P.weight_outlier_crow`` int32 [N + 1], ``P.weight_outlier_col`` int32 [nnz],
  ``P.weight_outlier_val`` [nnz] (the LUT's dtype): W = LUT part + CSR part.
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec, padded_columns
from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.weights.values import DenseAndSparseWeight, LUTWeight, SparseOutliers


class LUTLayout:
    kind = "lut"
    only_with_inputs = False

    def stores(self, weight) -> bool:
        return weight.kind == "lut" or (weight.kind == "dense_and_sparse" and weight.base_kind == "lut")

    def entry(self, weight) -> dict:
        nnz = weight.outlier_col.numel() if weight.kind == "dense_and_sparse" else 0
        return {"kind": self.kind, "bits": weight.bits, "outliers": nnz}

    def tensors(self, weight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {
            "weight_packed": pack_codes(weight.codes, weight.bits).t().contiguous(),
            "weight_lut": weight.lut,
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
        if weight.kind == "dense_and_sparse":
            tensors.update(
                weight_outlier_crow=weight.outlier_crow.to(torch.int32),
                weight_outlier_col=weight.outlier_col.to(torch.int32),
                weight_outlier_val=weight.outlier_val,
            )
        return tensors

    def tensor_specs(self, entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        n, k = shape
        bits = entry["bits"]
        specs = {
            "weight_packed": TensorSpec((n, padded_columns(k) * bits // 32), torch.int32),
            "weight_shape": TensorSpec((2,), torch.int64),
            "weight_lut": TensorSpec((n, 2**bits)),
        }
        nnz = entry.get("outliers", 0)
        if nnz:
            specs.update(
                weight_outlier_crow=TensorSpec((n + 1,), torch.int32),
                weight_outlier_col=TensorSpec((nnz,), torch.int32),
                weight_outlier_val=TensorSpec((nnz,)),
            )
        return specs

    def read(self, tensors: dict[str, torch.Tensor], entry: dict) -> LUTWeight | DenseAndSparseWeight:
        n, k = (int(v) for v in tensors["weight_shape"])
        codes = unpack_codes(tensors["weight_packed"].t(), entry["bits"], (n, k))
        base = LUTWeight(codes=codes, lut=tensors["weight_lut"], bits=entry["bits"])
        if not entry.get("outliers", 0):
            return base
        outliers = SparseOutliers(
            crow=tensors["weight_outlier_crow"],
            col=tensors["weight_outlier_col"],
            val=tensors["weight_outlier_val"],
            shape=(n, k),
        )
        return DenseAndSparseWeight.from_parts(base, outliers)


LAYOUT = LUTLayout()
