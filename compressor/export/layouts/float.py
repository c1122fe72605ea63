"""Floating-point weights (``weights/values.py``) in the native format: only for W+A layers whose activations
compressed-tensors cannot record (NVFP4's dynamic global scale, integer activations, channel maps); plain
float weights go to compressed-tensors, which engines read (spec: ``export/FORMATS.md``, "Float weights").

Per module ``P``: ``P.weight_packed`` uint8 the element codes: E4M3 bytes [N, K], or E2M1 nibbles
``sign << 3 | index`` two a byte [N, K/2] (the even column low, as compressed-tensors packs them);
``P.weight_scale`` the scales as ``FloatWeight`` holds them (the scale
dtype for FP8, float8_e4m3fn for NVFP4, uint8 E8M0 exponents for MXFP4), ``P.weight_global_scale`` fp32 [1]
(NVFP4), ``P.weight_shape`` int64 [2].
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec
from compressor.weights.values import FLOAT_GRIDS, FloatWeight, pack_e2m1, unpack_e2m1

SCALE_DTYPES = {"float": None, "e4m3": torch.float8_e4m3fn, "e8m0": torch.uint8}


class FloatLayout:
    kind = "float"
    only_with_inputs = True  # plain float weights go to compressed-tensors

    def stores(self, weight) -> bool:
        return weight.kind == "float"

    def entry(self, weight: FloatWeight) -> dict:
        return {"kind": self.kind, "grid": weight.grid, "bits": weight.bits, "outliers": 0}

    def tensors(self, weight: FloatWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        scales = weight.scales
        if weight.spec.scale == "float" and scale_dtype is not None:
            scales = scales.to(scale_dtype)
        tensors = {
            "weight_packed": weight.codes.to(torch.uint8) if weight.bits == 8 else pack_e2m1(weight.codes),
            "weight_scale": scales.contiguous(),
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
        if weight.global_scale is not None:
            tensors["weight_global_scale"] = weight.global_scale.float()
        return tensors

    def tensor_specs(self, entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        grid = FLOAT_GRIDS[entry["grid"]]
        specs = {
            "weight_packed": TensorSpec(shape if grid.bits == 8 else (shape[0], shape[1] // 2), torch.uint8),
            "weight_scale": TensorSpec(grid.scale_shape(*shape), SCALE_DTYPES[grid.scale]),
            "weight_shape": TensorSpec((2,), torch.int64),
        }
        if grid.global_scale:
            specs["weight_global_scale"] = TensorSpec((1,), torch.float32)
        return specs

    def read(self, tensors: dict[str, torch.Tensor], entry: dict) -> FloatWeight:
        packed = tensors["weight_packed"].to(torch.uint8)
        return FloatWeight(
            packed if FLOAT_GRIDS[entry["grid"]].bits == 8 else unpack_e2m1(packed),
            tensors["weight_scale"],
            tensors.get("weight_global_scale"),
            entry["grid"],
        )


LAYOUT = FloatLayout()
