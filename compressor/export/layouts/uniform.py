"""Uniform integer weights in the native format: only for W+A layers (spec: ``export/FORMATS.md``,
"W+A layers"); plain uniform weights go to compressed-tensors or GPTQ, which engines read.

Per module ``P``: ``P.weight_packed`` int32 (planes layout, transposed, as in ``lut.py``),
``P.weight_scale`` [N, G], ``P.weight_zero_point`` int32 [N, G] (asymmetric only, unsigned domain),
``P.weight_shape`` int64 [2].
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec, padded_columns
from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.weights.values import UniformWeight, num_groups


class UniformLayout:
    kind = "uniform"
    only_with_inputs = True  # the native format takes plain uniform weights from no export

    def stores(self, weight) -> bool:
        return weight.kind == "uniform"

    def entry(self, weight: UniformWeight) -> dict:
        return {
            "kind": self.kind,
            "bits": weight.bits,
            "group_size": weight.group_size,
            "symmetric": weight.symmetric,
            "outliers": 0,
        }

    def tensors(self, weight: UniformWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {
            "weight_packed": pack_codes(weight.codes, weight.bits).t().contiguous(),
            "weight_scale": weight.scales.to(scale_dtype or weight.scales.dtype),
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
        if weight.zeros is not None:
            tensors["weight_zero_point"] = weight.zeros.to(torch.int32)
        return tensors

    def tensor_specs(self, entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        n, k = shape
        groups = num_groups(k, entry["group_size"])
        specs = {
            "weight_packed": TensorSpec((n, padded_columns(k) * entry["bits"] // 32), torch.int32),
            "weight_shape": TensorSpec((2,), torch.int64),
            "weight_scale": TensorSpec((n, groups)),
        }
        if not entry["symmetric"]:
            specs["weight_zero_point"] = TensorSpec((n, groups), torch.int32)
        return specs

    def read(self, tensors: dict[str, torch.Tensor], entry: dict) -> UniformWeight:
        n, k = (int(v) for v in tensors["weight_shape"])
        codes = unpack_codes(tensors["weight_packed"].t(), entry["bits"], (n, k))
        zeros = tensors.get("weight_zero_point")
        return UniformWeight(
            codes=codes,
            scales=tensors["weight_scale"],
            zeros=None if zeros is None else zeros.to(torch.int32),
            bits=entry["bits"],
            group_size=entry["group_size"],
        )


LAYOUT = UniformLayout()
