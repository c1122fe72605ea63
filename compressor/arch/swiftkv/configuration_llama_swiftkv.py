"""Configs of SwiftKV models (Qiao et al., arXiv 2410.03960): a Llama or Qwen2 config plus the two keys
of the released Snowflake checkpoints.

* ``num_key_value_layers`` (M): layers ``0..M-1`` are unchanged; the keys and values of every layer
  ``l >= M`` are computed from the one residual stream entering layer M (SingleInputKV);
* ``key_value_group_size`` (G): consecutive groups of G layers from M on share one key/value
  projection and one KV-cache entry (AcrossKV); ``(num_hidden_layers - M) % G == 0``;
* ``swiftkv``: the training-time switch of ArcticTraining's config (false: the original model, with
  the original projections of every layer).

This file is shipped beside the weights of an export (with ``modeling_llama_swiftkv.py`` and an
``auto_map``), so it imports transformers only.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, Qwen2Config


def check_swiftkv_layers(num_hidden_layers: int, num_key_value_layers: int | None, key_value_group_size: int) -> int:
    """M after checking it and G against the layer count (M = N: no layer is rewired)."""
    layers = num_hidden_layers if num_key_value_layers is None else num_key_value_layers
    if not 1 <= layers <= num_hidden_layers:
        raise ValueError(f"num_key_value_layers: {layers} is outside 1..num_hidden_layers = {num_hidden_layers}")
    if key_value_group_size < 1 or (num_hidden_layers - layers) % key_value_group_size:
        raise ValueError(
            f"key_value_group_size: {key_value_group_size} does not divide the {num_hidden_layers - layers} layers "
            f"from num_key_value_layers = {layers} to num_hidden_layers = {num_hidden_layers}"
        )
    return layers


@strict
class LlamaSwiftKVConfig(LlamaConfig):
    model_type = "llama_swiftkv"

    num_key_value_layers: int | None = None
    key_value_group_size: int = 1
    swiftkv: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.num_key_value_layers = check_swiftkv_layers(
            self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size
        )


@strict
class Qwen2SwiftKVConfig(Qwen2Config):
    model_type = "qwen2_swiftkv"

    num_key_value_layers: int | None = None
    key_value_group_size: int = 1
    swiftkv: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.num_key_value_layers = check_swiftkv_layers(
            self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size
        )


__all__ = ["LlamaSwiftKVConfig", "Qwen2SwiftKVConfig"]
