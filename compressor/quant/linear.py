"""``QuantizedLinear``: the nn.Module that replaces an ``nn.Linear`` once its weight is quantized.

It holds the tensors of a quantized value type (see ``formats.py``) as buffers, so ``.to(device)``
and ``state_dict`` work as for any module, and computes ``y = x W^T + b`` through
``compressor.kernels.qlinear``, which picks a Triton kernel on a GPU and the torch reference
elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.quant.formats import QUANTIZED_WEIGHT_TYPES, static_fields, tensor_names


class QuantizedLinear(nn.Module):
    def __init__(self, weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_type = type(weight)
        self.weight_static = static_fields(weight)
        self.tensor_names = tensor_names(weight)
        for name in self.tensor_names:
            self.register_buffer(name, getattr(weight, name))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = weight.shape

    @property
    def quantized_weight(self):
        """The value type, rebuilt around this module's (possibly moved) buffers; no copy."""
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        return self.weight_type(**tensors, **self.weight_static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressor.kernels import qlinear

        return qlinear(x, self.quantized_weight, self.bias)

    def extra_repr(self) -> str:
        meta = ", ".join(f"{k}={v}" for k, v in self.weight_static.items())
        return f"{self.weight_type.kind}, in={self.in_features}, out={self.out_features}, {meta}"


def weight_type_by_kind(kind: str):
    return QUANTIZED_WEIGHT_TYPES[kind]
