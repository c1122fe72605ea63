"""The input side of a W+A layer in the native format, whatever its weight kind (spec:
``export/FORMATS.md``, "W+A layers").

A layer whose input is quantized per token (``input_activations``, a dynamic spec) and optionally
channel-mapped first (QLLM's reassembly: x'' = P x) adds to its entry ``input_activations`` and
``input_map`` (the map's nnz, 0 for none), and the tensors ``P.input_map_crow`` int32 [K + 1],
``P.input_map_col`` int32 [nnz], ``P.input_map_val`` fp32 [nnz] (CSR, row = new channel). Attention
modules whose Q, K, V are quantized are listed in the config's ``attention_activations``. NVFP4 activations
with a calibrated global scale (``dynamic: "local"``) add ``P.input_global_scale`` fp32 [1], the name
compressed-tensors gives it.
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec
from compressor.modules.activations import ActivationSpec, ChannelMap, install_attention_quantization


class InputLayout:
    def entry(self, module) -> dict:
        """The entry keys of a ``QuantizedLinear``'s input side: its activation spec and channel-map size."""
        spec, channel_map = module.input_activations, module.channel_map
        return {
            "input_activations": None if spec is None else spec.to_config(),
            "input_map": 0 if channel_map is None else channel_map.nnz,
        }

    def tensors(self, module) -> dict[str, torch.Tensor]:
        channel_map = module.channel_map
        scale = {} if module.input_global_scale is None else {"input_global_scale": module.input_global_scale.float()}
        if channel_map is None:
            return scale
        return {
            **scale,
            "input_map_crow": channel_map.crow.to(torch.int32),
            "input_map_col": channel_map.col.to(torch.int32),
            "input_map_val": channel_map.val.to(torch.float32),
        }

    def tensor_specs(self, entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        nnz = entry.get("input_map", 0)
        spec = ActivationSpec.from_config(entry.get("input_activations"))
        scale = {"input_global_scale": TensorSpec((1,), torch.float32)} if spec and spec.static_global_scale else {}
        if not nnz:
            return scale
        k = shape[1]
        return {
            **scale,
            "input_map_crow": TensorSpec((k + 1,), torch.int32),
            "input_map_col": TensorSpec((nnz,), torch.int32),
            "input_map_val": TensorSpec((nnz,), torch.float32),
        }

    def attach(self, module, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        """Give a loaded ``QuantizedLinear`` its input side back (spec and channel map)."""
        spec = ActivationSpec.from_config(entry.get("input_activations"))
        channel_map = None
        if entry.get("input_map", 0):
            channel_map = ChannelMap(
                tensors["input_map_crow"].to(torch.int32),
                tensors["input_map_col"].to(torch.int32),
                tensors["input_map_val"].float(),
                module.in_features,
            )
        if spec is not None or channel_map is not None:
            module.quantize_inputs(spec, channel_map, tensors.get("input_global_scale"))

    def config(self, attention: dict[str, dict]) -> dict:
        """The config keys of the quantized attention operands (module name -> spec in config form)."""
        return {"attention_activations": dict(sorted(attention.items()))} if attention else {}

    def install_attention(self, model, quantization_config: dict) -> None:
        """Quantize Q, K, V of the attention modules the config lists (``attention_activations``)."""
        for name, entry in (quantization_config.get("attention_activations") or {}).items():
            install_attention_quantization(model.get_submodule(name), ActivationSpec.from_config(entry))


LAYOUT = InputLayout()
