"""Block-floating-point weights in the native format (spec: ``export/FORMATS.md``, "Block floating point").

Per module ``P``: ``P.weight_packed`` int32 the unsigned mantissas ``u = M + 2**(m-1)`` in the planes
layout, transposed (as in ``lut.py``); ``P.weight_exponent`` uint8 [N, ceil(K / n)] (``e = E + 127``,
0 = all-zero block); ``P.weight_shape`` int64 [2].
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec, padded_columns
from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.weights.values import BFPWeight


class BFPLayout:
    kind = "bfp"
    only_with_inputs = False

    def stores(self, weight) -> bool:
        return weight.kind == "bfp"

    def entry(self, weight: BFPWeight) -> dict:
        return {"kind": self.kind, "bits": weight.mantissa_bits, "block_size": weight.block_size}

    def tensors(self, weight: BFPWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {
            "weight_packed": pack_codes(weight.mantissas, weight.mantissa_bits).t().contiguous(),
            "weight_exponent": weight.exponents.to(torch.uint8).contiguous(),
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }

    def tensor_specs(self, entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        n, k = shape
        return {
            "weight_packed": TensorSpec((n, padded_columns(k) * entry["bits"] // 32), torch.int32),
            "weight_exponent": TensorSpec((n, -(-k // entry["block_size"])), torch.uint8),
            "weight_shape": TensorSpec((2,), torch.int64),
        }

    def read(self, tensors: dict[str, torch.Tensor], entry: dict) -> BFPWeight:
        n, k = (int(v) for v in tensors["weight_shape"])
        mantissas = unpack_codes(tensors["weight_packed"].t(), entry["bits"], (n, k))
        return BFPWeight(mantissas, tensors["weight_exponent"].to(torch.uint8), entry["bits"], entry["block_size"])


LAYOUT = BFPLayout()
