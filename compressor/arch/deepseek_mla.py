"""The DeepSeek-V3 config of a model whose attention TransMLA converted to multi-head latent attention.

The converted blocks already hold their tensors under DeepSeek-V3's names (``q_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; the MLP and norms keep the
names Llama and DeepSeek share), so the exporter writes them as they are; only ``config.json``
changes. This module builds that config from the source model's (see ``shared/methods/formats.md``
section (d)):

* ``model_type: deepseek_v3``, ``num_key_value_heads = num_attention_heads`` (MLA has no grouping),
  ``q_lora_rank: null`` (a plain ``q_proj``), the MLA sizes, and a dense MLP in every layer
  (``first_k_dense_replace = num_hidden_layers``; the MoE keys must be integers in transformers 5,
  so they are 1 and never used);
* the source's rotary base (as ``rope_parameters`` and the older ``rope_theta``) with ``rope_interleave: true``: the converter writes the rotary rows
  interleaved, which is the layout both transformers (``apply_rotary_pos_emb_interleave``) and vLLM
  (``is_neox_style=False``) rotate.
"""

from __future__ import annotations

from transformers import DeepseekV3Config

COPIED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


def deepseek_v3_config(source, *, kv_lora_rank: int, qk_rope_head_dim: int, qk_nope_head_dim: int, v_head_dim: int) -> DeepseekV3Config:
    """The config under which ``DeepseekV3ForCausalLM`` runs the converted model."""
    settings = {key: getattr(source, key) for key in COPIED_KEYS if getattr(source, key, None) is not None}
    layers = source.num_hidden_layers
    config = DeepseekV3Config(
        **settings,
        num_key_value_heads=source.num_attention_heads,
        q_lora_rank=None,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=qk_nope_head_dim,
        v_head_dim=v_head_dim,
        attention_bias=bool(getattr(source, "attention_bias", False)),
        rope_parameters={"rope_type": "default", "rope_theta": source.rope_parameters["rope_theta"]},
        rope_interleave=True,
        first_k_dense_replace=layers,
        n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1, moe_intermediate_size=1,
        n_group=1, topk_group=1, routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer to look for
    )
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.rope_theta = source.rope_parameters["rope_theta"]  # the pre-transformers-5 key, for older readers (vLLM's copy)
    config._attn_implementation = getattr(source, "_attn_implementation", None)
    return config


def kv_cache_elements_per_token(config) -> int:
    """Cached numbers per token over all layers, counted from a config: GQA keys and values, or MLA's
    latent plus its shared rotary key."""
    if getattr(config, "kv_lora_rank", None):
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_layer = 2 * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    return per_layer * config.num_hidden_layers
