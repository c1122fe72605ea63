"""The export side of SwiftKV: the config a ``swiftkv`` step declares, the modeling files shipped with
it, their registration with transformers, and the KV-cache size counted from a filled cache.

The checkpoint is the released Snowflake layout (``model_type: llama_swiftkv``,
``num_key_value_layers``, ``key_value_group_size``, the ``*_swiftkv`` weights beside every base weight);
Qwen2 bases get ``qwen2_swiftkv`` (same keys, q/k/v biases). ``configuration_llama_swiftkv.py`` and
``modeling_llama_swiftkv.py`` beside this file are written into the checkpoint with an ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it in a process that never
imported compressor; ``import compressor`` registers the same classes with transformers
(``transformers_hook.py``), so our loader and ``compressor eval`` load it without remote code.
"""

from __future__ import annotations

from pathlib import Path

from compressor.arch import UnsupportedArchitecture

HERE = Path(__file__).resolve().parent
MODELING_FILES = ("configuration_llama_swiftkv.py", "modeling_llama_swiftkv.py")
# base model_type -> (SwiftKV model_type, config class, causal-LM class), by name in the shipped files
FAMILIES = {
    "llama": ("llama_swiftkv", "LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM"),
    "qwen2": ("qwen2_swiftkv", "Qwen2SwiftKVConfig", "Qwen2SwiftKVForCausalLM"),
}
DROPPED_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "num_key_value_layers", "key_value_group_size", "swiftkv")


def check_family(config) -> tuple[str, str, str]:
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedArchitecture(
            f"swiftkv: model_type '{getattr(config, 'model_type', None)}' has no SwiftKV model; supported: {', '.join(FAMILIES)}"
        )
    if any(t == "sliding_attention" for t in getattr(config, "layer_types", None) or []):
        raise UnsupportedArchitecture("swiftkv: sliding-window layers are not supported (the upper layers attend over the whole cache)")
    return family


def swiftkv_config(source, num_key_value_layers: int, key_value_group_size: int):
    """The config of the SwiftKV version of ``source`` (a Llama or Qwen2 config)."""
    from compressor.arch import configuration_llama_swiftkv

    model_type, config_name, model_name = check_family(source)
    settings = {k: v for k, v in source.to_dict().items() if k not in DROPPED_KEYS}
    config = getattr(configuration_llama_swiftkv, config_name)(
        **settings, num_key_value_layers=num_key_value_layers, key_value_group_size=key_value_group_size, swiftkv=True,
    )
    config.architectures = [model_name]
    config._attn_implementation = getattr(source, "_attn_implementation", None)
    return config


def modeling_files() -> dict[str, str]:
    """File name -> source of the modeling code an export ships."""
    return {name: (HERE / name).read_text() for name in MODELING_FILES}


def auto_map(config) -> dict[str, str]:
    _, config_name, model_name = next(f for f in FAMILIES.values() if f[0] == config.model_type)
    return {"AutoConfig": f"configuration_llama_swiftkv.{config_name}", "AutoModelForCausalLM": f"modeling_llama_swiftkv.{model_name}"}


def register_configs() -> None:
    """``AutoConfig`` learns ``llama_swiftkv`` and ``qwen2_swiftkv`` (called by ``import compressor``'s hook)."""
    from transformers import AutoConfig

    from compressor.arch import configuration_llama_swiftkv

    for model_type, config_name, _ in FAMILIES.values():
        AutoConfig.register(model_type, getattr(configuration_llama_swiftkv, config_name), exist_ok=True)


def register_models() -> None:
    """``AutoModelForCausalLM`` learns the SwiftKV causal LMs."""
    from transformers import AutoModelForCausalLM

    from compressor.arch import configuration_llama_swiftkv, modeling_llama_swiftkv

    for _, config_name, model_name in FAMILIES.values():
        AutoModelForCausalLM.register(getattr(configuration_llama_swiftkv, config_name), getattr(modeling_llama_swiftkv, model_name), exist_ok=True)


def kv_cache_bytes(cache) -> int:
    """Bytes the keys and values of a filled transformers cache hold (layers that share another's entry hold none)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total
