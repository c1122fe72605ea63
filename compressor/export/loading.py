"""Reading an exported checkpoint back into our modules (``QuantizedLinear`` with our kernels).

``transformers.AutoModelForCausalLM.from_pretrained`` also loads our symmetric compressed-tensors
exports (the weights stay packed and compressed-tensors unpacks them in each forward), our GPTQ ones
when optimum and gptqmodel are installed, and, after ``import compressor``, our native ones
(``export/hf_quantizer.py``); this loader reads every format (the codec by ``quant_method``) and keeps
the weights quantized so ``compressor validate`` can run them through the kernels; it also
installs the quantized KV cache an export declares (``kv_cache``, through ``compressor.kvcache``) and the
online Hadamard of a rotated model's MLPs (``online_hadamard``, ``compressor.modules.hadamard``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModelForCausalLM

from compressor import kvcache
from compressor.export import compressed_tensors
from compressor.export.codecs import FORMATS
from compressor.model import safetensors_index
from compressor.modules.hadamard import install_online_hadamard
from compressor.modules.linear import QuantizedLinear
from compressor.moe import model_name, unfuse_model_experts


def load_quantized_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code: bool = False
):
    """A transformers model whose quantized linears are ``QuantizedLinear`` modules. Our shipped
    architectures (``compressor.arch.shipped``) load without remote code; another ``auto_map`` needs
    ``trust_remote_code=True``."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is not None and not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    skeleton_config = copy.deepcopy(config)
    if hasattr(skeleton_config, "quantization_config"):
        del skeleton_config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(skeleton_config, trust_remote_code=trust_remote_code)
    moe_adapter = unfuse_model_experts(model, config)  # experts as per-expert linears, as the export names them
    codec = FORMATS.get(quantization_config.get("quant_method")) if quantization_config is not None else None
    kv_cache = (quantization_config or {}).get("kv_cache")
    if codec is compressed_tensors:
        kv_cache = compressed_tensors.kv_cache_entry(quantization_config)
    if kv_cache:
        kvcache.prepare(model, kv_cache, device)
    install_online_hadamard(model, (quantization_config or {}).get("online_hadamard") or {})
    files = safetensors_index(path)
    by_module: dict[str, dict[str, str]] = {}
    for name in files:
        module, _, tensor = (model_name(moe_adapter, name) if moe_adapter is not None else name).rpartition(".")
        by_module.setdefault(module, {})[tensor] = name
    from safetensors import safe_open

    handles = {}
    try:

        def read(name):
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(file, "pt")
            return handles[file].get_tensor(name)

        packed = codec.PACKED if codec is not None else "weight_packed"
        for module_name, tensors in by_module.items():
            if packed in tensors or "weight_scale" in tensors:  # FP8 weights keep the name ``weight``
                if codec is None:
                    raise ValueError(
                        f"{path}: {module_name} has packed weights, but quant_method "
                        f"{(quantization_config or {}).get('quant_method')!r} is none of {', '.join(FORMATS)}"
                    )
                values = {t: read(n) for t, n in tensors.items()}
                stored = next(iter(tensors.values())).rpartition(".")[0]  # the module's name in the checkpoint
                weight = codec.read_module(values, quantization_config, stored, dtype)
                bias = values.get("bias")
                module = QuantizedLinear(weight, bias.to(dtype) if bias is not None else None)
                if codec.INPUTS is not None:
                    codec.INPUTS.attach(module, values, codec.input_entry(quantization_config, stored))
                module = module.to(device)
                model.set_submodule(module_name, module)
            else:
                for tensor, name in tensors.items():
                    set_module_tensor_to_device(model, f"{module_name}.{tensor}", device, value=read(name), dtype=dtype)
    finally:
        handles.clear()
    if codec is not None and codec.INPUTS is not None:
        codec.INPUTS.install_attention(model, quantization_config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if kv_cache:
        kvcache.install(model, kv_cache)
    model.eval()
    return model
