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
* the source's rotary base (as ``rope_parameters`` and the older ``rope_theta``) with ``rope_interleave: true``: the
  converter writes the rotary rows interleaved, which is the layout both transformers
  (``apply_rotary_pos_emb_interleave``) and vLLM (``is_neox_style=False``) rotate.
"""

from __future__ import annotations

from transformers import DeepseekV3Config

COPIED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def rope_parameters(source, qk_rope_head_dim: int, rope_frequencies=None) -> dict:
    """DeepSeek-V3's rotary settings for the frequencies the conversion kept (``rope_frequencies``:
    for each rotary pair, the index of the source's frequency; None: DeepSeek's own, ``theta **
    (-2i / qk_rope_head_dim)``). Frequencies a plain rotary of that size has not (every key dim of
    every kv head keeps RoPE, so each frequency appears once per kv head) are written as ``longrope``
    with per-pair factors and no attention scaling (``factor`` and ``attention_factor`` 1), which
    transformers' ``DeepseekV3RotaryEmbedding`` computes exactly; vLLM's DeepSeek turns any rope
    scaling into ``deepseek_yarn``, so such a checkpoint is for transformers only."""
    import torch

    theta = source.rope_parameters["rope_theta"]
    plain = {"rope_type": "default", "rope_theta": theta}
    if rope_frequencies is None:
        return plain
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    source_inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wanted = source_inv[torch.as_tensor(rope_frequencies)]
    own = theta ** (-torch.arange(0, qk_rope_head_dim, 2, dtype=torch.float64) / qk_rope_head_dim)
    if torch.allclose(wanted, own, rtol=1e-12, atol=0):
        return plain
    factors = (own / wanted).tolist()  # longrope: inv_freq = 1 / (factor * theta ** (2i / dim))
    positions = source.max_position_embeddings
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "short_factor": factors,
        "long_factor": factors,
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": positions,
    }


def deepseek_v3_config(
    source, *, kv_lora_rank: int, qk_rope_head_dim: int, qk_nope_head_dim: int, v_head_dim: int, rope_frequencies=None
) -> DeepseekV3Config:
    """The config under which ``DeepseekV3ForCausalLM`` runs the converted model."""
    settings = {key: getattr(source, key) for key in COPIED_KEYS if getattr(source, key, None) is not None}
    layers = source.num_hidden_layers
    rope = rope_parameters(source, qk_rope_head_dim, rope_frequencies)
    config = DeepseekV3Config(
        **settings,
        num_key_value_heads=source.num_attention_heads,
        q_lora_rank=None,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=qk_nope_head_dim,
        v_head_dim=v_head_dim,
        attention_bias=bool(getattr(source, "attention_bias", False)),
        rope_parameters=rope,
        rope_interleave=True,
        first_k_dense_replace=layers,
        n_routed_experts=1,
        n_shared_experts=1,
        num_experts_per_tok=1,
        moe_intermediate_size=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer to look for
    )
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.rope_theta = source.rope_parameters[
        "rope_theta"
    ]  # the pre-transformers-5 key, for older readers (vLLM's copy)
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
