"""The export side of SwiftKV: the config a ``swiftkv`` step declares (its modeling files and their
registration are its row in ``arch/shipped.py``), and the KV-cache size counted from a filled cache.

The checkpoint is the released Snowflake layout (``model_type: llama_swiftkv``,
``num_key_value_layers``, ``key_value_group_size``, the ``*_swiftkv`` weights beside every base weight);
Qwen2 bases get ``qwen2_swiftkv`` (same keys, q/k/v biases). ``configuration_llama_swiftkv.py`` and
``modeling_llama_swiftkv.py`` in this package are written into the checkpoint with an ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it in a process that never
imported compressor; ``import compressor`` registers the same classes with transformers, so it loads
without remote code there.
"""

from __future__ import annotations

from compressor.arch import UnsupportedArchitecture
from compressor.arch.shipped import architecture

DROPPED_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "num_key_value_layers",
    "key_value_group_size",
    "swiftkv",
)


def swiftkv_model_type(config) -> str:
    """The SwiftKV model type of ``config``'s family (refusing families and layouts it cannot take)."""
    base = getattr(config, "model_type", None)
    row = architecture("swiftkv")
    model_type = row.model_type_for(base)
    if model_type is None:
        raise UnsupportedArchitecture(
            f"swiftkv: model_type '{base}' has no SwiftKV model; supported: {', '.join(row.model_types.values())}"
        )
    if any(t == "sliding_attention" for t in getattr(config, "layer_types", None) or []):
        raise UnsupportedArchitecture(
            "swiftkv: sliding-window layers are not supported (the upper layers attend over the whole cache)"
        )
    return model_type


def swiftkv_config(source, num_key_value_layers: int, key_value_group_size: int):
    """The config of the SwiftKV version of ``source`` (a Llama or Qwen2 config)."""
    row = architecture("swiftkv")
    model_type = swiftkv_model_type(source)
    config_class, model_class = row.classes[model_type]
    settings = {k: v for k, v in source.to_dict().items() if k not in DROPPED_KEYS}
    config = row.shipped_class(config_class)(
        **settings,
        num_key_value_layers=num_key_value_layers,
        key_value_group_size=key_value_group_size,
        swiftkv=True,
    )
    config.architectures = [model_class.rpartition(".")[2]]
    config._attn_implementation = getattr(source, "_attn_implementation", None)
    return config


def kv_cache_bytes(cache) -> int:
    """Bytes the keys and values of a filled transformers cache hold (layers that share another's entry hold none)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total
