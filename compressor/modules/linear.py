"""``QuantizedLinear``: the nn.Module that replaces an ``nn.Linear`` once its weight is quantized.

It holds the tensors of a quantized value type (see ``formats.py``) as buffers, so ``.to(device)``
and ``state_dict`` work as for any module, and computes ``y = x W^T + b`` through
``compressor.kernels.qlinear``, which picks a Triton kernel on a GPU and the torch reference
elsewhere. ``dequantize_model_`` turns every one back into a dense ``nn.Linear`` (transformers'
``model.dequantize()``, and the dense baseline of ``compressor validate``).

For quantization-aware training, ``train_tensors(["scales"])`` holds chosen value tensors as fp32
``nn.Parameter``s (parameters keep their identity and gradients when the module moves between
devices; buffers do not); while any is trainable, the forward dequantizes with torch, which has a
backward (the kernels do not). ``freeze()`` turns them back into buffers of their former dtype.

W+A quantization: ``quantize_inputs(spec, channel_map)`` makes the layer fake-quantize its input per
token (``activations.ActivationSpec``), after an optional fixed channel map ``P`` (held as the
buffers ``input_map_crow/col/val``), so ``y = W_hat Q_a(P x) + b``.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.modules.activations import ActivationSpec, ChannelMap, apply_channel_map, quantize_activations
from compressor.weights.values import static_fields, tensor_names


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
        self.trained_dtypes: dict[str, torch.dtype] = {}  # value tensors now held as trainable parameters
        # the dtype each value tensor was quantized to: a session's ``.to(dtype)`` casts floating buffers
        self.stored_dtypes = {
            name: getattr(weight, name).dtype for name in self.tensor_names if getattr(weight, name) is not None
        }
        self.input_activations: ActivationSpec | None = None  # per-token fake-quantization of the input
        for part in ("crow", "col", "val"):  # CSR of a channel map applied first (None: none)
            self.register_buffer(f"input_map_{part}", None)
        self.register_buffer("input_global_scale", None)  # fp32 [1]: a static NVFP4 input's calibrated global scale

    def quantize_inputs(
        self,
        spec: ActivationSpec | None,
        channel_map: ChannelMap | None = None,
        global_scale: torch.Tensor | None = None,
    ) -> None:
        """Fake-quantize the input per token at ``spec`` (None: not), after ``channel_map`` (None: none);
        ``global_scale`` (fp32 [1]) for a spec with a static global scale (NVFP4 in compressed-tensors' form)."""
        if spec is not None and spec.static_global_scale and global_scale is None:
            raise ValueError("static NVFP4 activations need their calibrated input_global_scale")
        if channel_map is not None and (channel_map.channels, channel_map.in_channels) != (
            self.in_features,
            self.in_features,
        ):
            raise ValueError(
                f"channel map {channel_map.channels}x{channel_map.in_channels} does not fit {self.in_features} input "
                "features"
            )
        self.input_activations = spec
        for part in ("crow", "col", "val"):
            self.register_buffer(f"input_map_{part}", None if channel_map is None else getattr(channel_map, part))
        static = spec is not None and spec.static_global_scale
        self.register_buffer("input_global_scale", global_scale.float().reshape(1) if static else None)

    @property
    def channel_map(self) -> ChannelMap | None:
        if self.input_map_crow is None:
            return None
        return ChannelMap(self.input_map_crow, self.input_map_col, self.input_map_val, self.in_features)

    @property
    def quantizes_inputs(self) -> bool:
        return self.input_activations is not None or self.input_map_crow is not None

    def train_tensors(self, names: list[str]) -> list[nn.Parameter]:
        """Hold the named value tensors as trainable fp32 parameters (the rest stay frozen buffers)."""
        parameters = []
        for name in names:
            tensor = self._buffers.pop(name)
            self.trained_dtypes[name] = tensor.dtype
            self.register_parameter(name, nn.Parameter(tensor.detach().float()))
            parameters.append(getattr(self, name))
        return parameters

    def freeze(self) -> None:
        """Trained tensors back to buffers in their former dtype (integer ones are rounded first)."""
        for name, dtype in self.trained_dtypes.items():
            value = self._parameters.pop(name).detach()
            self.register_buffer(name, value.to(dtype) if dtype.is_floating_point else value.round().to(dtype))
        self.trained_dtypes = {}

    @property
    def quantized_weight(self):
        """The value type, rebuilt around this module's (possibly moved) buffers; no copy."""
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        return self.weight_type(**tensors, **self.weight_static)

    @property
    def stored_weight(self):
        """The value type with every tensor back in the dtype it was quantized to (what export writes)."""
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        tensors = {
            name: t.to(self.stored_dtypes[name]) if name in self.stored_dtypes and t is not None else t
            for name, t in tensors.items()
        }
        return self.weight_type(**tensors, **self.weight_static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressor.kernels import qlinear, reference_linear

        if self.input_map_crow is not None:
            x = apply_channel_map(x, self.input_map_crow, self.input_map_col, self.input_map_val)
        if self.input_activations is not None:
            x = quantize_activations(x, self.input_activations, self.input_global_scale)
        if self.trained_dtypes and torch.is_grad_enabled():
            return reference_linear(x, self.quantized_weight, self.bias)
        return qlinear(x, self.quantized_weight, self.bias)

    def extra_repr(self) -> str:
        meta = ", ".join(f"{k}={v}" for k, v in self.weight_static.items())
        inputs = "" if self.input_activations is None else f", input_bits={self.input_activations.bits}"
        mapped = "" if self.input_map_crow is None else f", input_map_nnz={self.input_map_col.numel()}"
        return f"{self.weight_type.kind}, in={self.in_features}, out={self.out_features}, {meta}{inputs}{mapped}"


def dequantize_model_(model, dtype) -> int:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantized weight (a channel map folded
    in; activation quantization dropped); returns the count."""
    from compressor.kernels import dequantize, use_backend

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name, module in targets:
        with use_backend("auto"):
            weight = dequantize(module.quantized_weight, dtype)
            if module.channel_map is not None:  # W (P x) = (W P) x: the map folds into a dense weight
                weight = (weight.float() @ module.channel_map.dense().to(weight.device)).to(dtype)
        dense = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=dtype
        )
        dense.weight.data = weight
        if module.bias is not None:
            dense.bias.data = module.bias.to(dtype)
        model.set_submodule(name, dense)
    return len(targets)
