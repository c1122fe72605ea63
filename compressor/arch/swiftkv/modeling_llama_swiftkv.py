"""SwiftKV models for transformers (Qiao et al., arXiv 2410.03960): Llama and Qwen2 with SingleInputKV
and AcrossKV, whose prefill really skips the upper layers' work for the tokens whose output is not needed.

Layout (that of Snowflake's released ``llama_swiftkv`` checkpoints): every base weight, plus
``model.norm_swiftkv`` and, in each layer ``l >= M = num_key_value_layers``,
``self_attn.q_proj_swiftkv`` and (in the first layer of each group of ``key_value_group_size`` layers)
``self_attn.k_proj_swiftkv`` / ``self_attn.v_proj_swiftkv``.

Forward with ``config.swiftkv`` (the served model): layers ``0..M-1`` run as in the base model for
every token; ``s = norm_swiftkv(h_M)`` (``h_M`` the residual stream entering layer M); each group
leader's keys and values come from ``s`` for every token (keys rotated at each token's position) and
go into the KV cache once per group; the upper layers then run, with ``q_proj_swiftkv`` queries, only
on the last ``logits_to_keep`` tokens (``generate`` asks for 1: the skip; 0, as perplexity needs, runs
every token and skips nothing). With ``swiftkv`` false every layer uses its original projections: the
base model exactly.

This file is shipped beside the weights of an export and imports transformers and torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    repeat_kv,
    rotate_half,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from .configuration_llama_swiftkv import LlamaSwiftKVConfig, Qwen2SwiftKVConfig

# ----------------------------------------------------------------------------------------------
# The SwiftKV path as plain functions (the toolkit's training wrapper calls the same ones)


def group_leader(config, layer_idx: int) -> int:
    """The layer whose key/value projection and cache entry layer ``layer_idx`` (>= M) uses."""
    first = config.num_key_value_layers
    return layer_idx - (layer_idx - first) % config.key_value_group_size


def add_swiftkv_projections(attention: nn.Module, config, layer_idx: int) -> None:
    """Give an upper layer's attention its ``q_proj_swiftkv`` (and, for a group leader, its
    ``k_proj_swiftkv`` / ``v_proj_swiftkv``), shaped and biased like the originals."""

    def like(linear: nn.Linear) -> nn.Linear:
        return nn.Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    attention.q_proj_swiftkv = like(attention.q_proj)
    if group_leader(config, layer_idx) == layer_idx:
        attention.k_proj_swiftkv = like(attention.k_proj)
        attention.v_proj_swiftkv = like(attention.v_proj)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [B, heads, T, d] with ``cos``/``sin`` [B, T, d]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def swiftkv_key_values(attention: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A group leader's keys (rotated) and values ``[B, n_kv, T, d]`` from the shared input ``s``."""
    shape = (*states.shape[:-1], -1, attention.head_dim)
    keys = attention.k_proj_swiftkv(states).view(shape).transpose(1, 2)
    values = attention.v_proj_swiftkv(states).view(shape).transpose(1, 2)
    return rotate(keys, cos, sin), values


def swiftkv_attention(attention: nn.Module, x: torch.Tensor, keys, values, cos, sin, mask) -> torch.Tensor:
    """Attention of the query tokens ``x`` [B, Tq, D] (normalised) over ``keys``/``values``
    [B, n_kv, Tk, d]; ``mask`` [B|1, 1, Tq, Tk] (bool: may attend, or additive), or None for a causal
    mask with Tq == Tk."""
    shape = (*x.shape[:-1], -1, attention.head_dim)
    queries = rotate(attention.q_proj_swiftkv(x).view(shape).transpose(1, 2), cos, sin)
    groups = queries.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(
        queries,
        repeat_kv(keys, groups),
        repeat_kv(values, groups),
        attn_mask=mask,
        is_causal=mask is None and queries.shape[2] > 1,
        scale=attention.scaling,
    )
    return attention.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


def swiftkv_layer(layer: nn.Module, hidden: torch.Tensor, keys, values, cos, sin, mask) -> torch.Tensor:
    """An upper decoder layer on the query tokens ``hidden`` with the given keys and values."""
    hidden = hidden + swiftkv_attention(layer.self_attn, layer.input_layernorm(hidden), keys, values, cos, sin, mask)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def upper_layer_mask(query_count: int, key_count: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """May-attend mask [B|1, 1, Tq, Tk] of the last ``query_count`` of ``key_count`` cached tokens
    (causal, and the 2-D padding mask if given). A query row with nothing to attend to (a left pad)
    attends to everything, to stay finite; its output is never used."""
    key_positions = torch.arange(key_count, device=device)
    query_positions = key_positions[key_count - query_count :]
    allowed = (key_positions[None, :] <= query_positions[:, None])[None]
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, -key_count:].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


# ----------------------------------------------------------------------------------------------
# Models


class SwiftKVModelMixin:
    """The decoder stack; subclasses name the family's layer, norm and rotary classes."""

    decoder_layer_class = LlamaDecoderLayer
    norm_class = LlamaRMSNorm
    rotary_class = LlamaRotaryEmbedding

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        for index in range(config.num_key_value_layers, config.num_hidden_layers):
            add_swiftkv_projections(self.layers[index].self_attn, config, index)
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_swiftkv = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("cache_position", None)
        kwargs.pop("return_dict", None)
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.pop(flag, False):
                raise ValueError(
                    f"{type(self).__name__}: {flag} is not supported (the upper layers may run on a subset of the "
                    "tokens)"
                )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden = inputs_embeds
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        config = self.config
        first_upper = config.num_key_value_layers if config.swiftkv else config.num_hidden_layers
        for layer in self.layers[:first_upper]:
            hidden = layer(
                hidden,
                attention_mask=causal_mask,
                position_embeddings=(cos, sin),
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        if first_upper < config.num_hidden_layers:
            # SingleInputKV: every upper layer's keys and values from the stream entering layer M, for all tokens;
            # the upper layers themselves only for the tokens whose output is needed.
            states = self.norm_swiftkv(hidden)
            keep = logits_to_keep if isinstance(logits_to_keep, int) and 0 < logits_to_keep < length else length
            hidden = hidden[:, length - keep :]
            query_cos, query_sin = cos[:, length - keep :], sin[:, length - keep :]
            mask = upper_layer_mask(keep, past + length, attention_mask, hidden.device)
            for index in range(first_upper, config.num_hidden_layers):
                layer = self.layers[index]
                if group_leader(config, index) == index:  # AcrossKV: the group's one key/value entry
                    keys, values = swiftkv_key_values(layer.self_attn, states, cos, sin)
                    if cache is not None:
                        keys, values = cache.update(keys, values, index)
                hidden = swiftkv_layer(layer, hidden, keys, values, query_cos, query_sin, mask)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)


class SwiftKVForCausalLMMixin:
    """The causal LM around a SwiftKV decoder stack; subclasses name it (``model_class``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_class: type

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As the base model's; ``logits_to_keep`` (0: every token) also says which tokens the upper
        layers run on, so a perplexity (logits for every token) skips nothing."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=0 if labels is not None else logits_to_keep,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > hidden.shape[1]:
            logits_to_keep = 0
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


class LlamaSwiftKVModel(SwiftKVModelMixin, LlamaPreTrainedModel):
    config_class = LlamaSwiftKVConfig
    config: LlamaSwiftKVConfig


class LlamaSwiftKVForCausalLM(SwiftKVForCausalLMMixin, LlamaPreTrainedModel, GenerationMixin):
    config_class = LlamaSwiftKVConfig
    config: LlamaSwiftKVConfig
    model_class = LlamaSwiftKVModel


class Qwen2SwiftKVModel(SwiftKVModelMixin, Qwen2PreTrainedModel):
    config_class = Qwen2SwiftKVConfig
    config: Qwen2SwiftKVConfig
    decoder_layer_class = Qwen2DecoderLayer
    norm_class = Qwen2RMSNorm
    rotary_class = Qwen2RotaryEmbedding


class Qwen2SwiftKVForCausalLM(SwiftKVForCausalLMMixin, Qwen2PreTrainedModel, GenerationMixin):
    config_class = Qwen2SwiftKVConfig
    config: Qwen2SwiftKVConfig
    model_class = Qwen2SwiftKVModel


__all__ = ["LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel", "Qwen2SwiftKVForCausalLM", "Qwen2SwiftKVModel"]
