"""MoDeGPT's sliced architecture: Llama-family blocks whose widths differ per layer.

After MoDeGPT (``compressor/lowrank/modegpt.py``) each decoder layer ``i`` keeps its head counts but
has its own MLP width, query/key head dim (whole rotary pairs, each keeping its original frequency,
chosen per KV head) and value head dim; the softmax scale stays that of the original head dim. No
transformers class expresses that, so sliced checkpoints ship this file as ``modeling_modegpt.py``
with ``auto_map`` (``trust_remote_code=True``), and ``import compressor`` registers the same classes
(``compressor/arch/shipped.py``), so they need no remote code there. It imports only torch and
transformers, as shipped modeling code must.

The config is the base family's plus one key, ``modegpt``: ``{"version": 1, "layers": [{
"intermediate_size", "qk_head_dim", "v_head_dim", "rope_pairs": [[p, ...] per KV head]}, ...]}``.
Weight names are the base family's; only their shapes differ, so a stock class refuses them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with zeros appended to its last dim up to ``width``."""
    return nn.functional.pad(x, (0, width - x.shape[-1]))


def rope_coordinates(pairs: list[list[int]], head_dim: int) -> torch.Tensor:
    """``[n_kv, 2p]`` coordinates of the kept rotary pairs ``(p, p + head_dim/2)`` in the half-split layout."""
    pairs = torch.tensor(pairs, dtype=torch.long)
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


class SlicedAttention(nn.Module):
    """A Llama-family attention with query/key head dim ``qk_head_dim`` (rotary pairs ``rope_pairs``
    of each KV head, shared by its query heads) and value head dim ``v_head_dim``, built from the
    stock attention ``stock`` of the same layer (its config, scale, sliding window, q/k norms)."""

    def __init__(self, stock: nn.Module, qk_head_dim: int, v_head_dim: int, rope_pairs: list[list[int]]):
        super().__init__()
        config = stock.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if getattr(stock, "q_norm", None) is not None and qk_head_dim != stock.head_dim:
            raise ValueError(f"per-head q/k norms over {stock.head_dim} dims cannot act on {qk_head_dim} kept dims")
        self.config, self.layer_idx = config, stock.layer_idx
        self.head_dim = stock.head_dim  # the original head dim: its 1/sqrt sets the softmax scale
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim
        self.num_key_value_groups = heads // kv_heads
        self.scaling = stock.scaling
        self.attention_dropout = stock.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(stock, "sliding_window", None)
        hidden = config.hidden_size

        def linear(reference: nn.Linear, inputs: int, outputs: int) -> nn.Linear:
            return nn.Linear(
                inputs,
                outputs,
                bias=reference.bias is not None,
                device=reference.weight.device,
                dtype=reference.weight.dtype,
            )

        self.q_proj = linear(stock.q_proj, hidden, heads * qk_head_dim)
        self.k_proj = linear(stock.k_proj, hidden, kv_heads * qk_head_dim)
        self.v_proj = linear(stock.v_proj, hidden, kv_heads * v_head_dim)
        self.o_proj = linear(stock.o_proj, heads * v_head_dim, hidden)
        self.q_norm = getattr(stock, "q_norm", None)
        self.k_norm = getattr(stock, "k_norm", None)
        self.rope_pairs = [[int(p) for p in row] for row in rope_pairs]
        self.every_pair = all(
            row == list(range(stock.head_dim // 2)) for row in self.rope_pairs
        )  # RoPE as the stock layer's
        self._key_coordinates: dict[torch.device, torch.Tensor] = {}

    def key_coordinates(self, device: torch.device) -> torch.Tensor:
        """``[n_kv, qk]``: the rotary coordinate (into the original head dim) of each kept key dim."""
        if device not in self._key_coordinates:
            self._key_coordinates[device] = rope_coordinates(self.rope_pairs, self.head_dim).to(device)
        return self._key_coordinates[device]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` [batch, tokens, heads, qk] with each KV head's kept frequencies (its query heads'
        too: the group is a view, so nothing is gathered per query head)."""
        if self.every_pair:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
            return x * cos + rotate_half(x) * sin
        index = self.key_coordinates(cos.device)
        cos, sin = cos[..., index][:, :, :, None, :], sin[..., index][:, :, :, None, :]  # [batch, tokens, n_kv, 1, qk]
        grouped = x.view(*x.shape[:2], index.shape[0], -1, x.shape[-1])  # [batch, tokens, n_kv, heads per kv head, qk]
        return (grouped * cos + rotate_half(grouped) * sin).view(x.shape)

    def forward(
        self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None, **kwargs
    ):
        cache = cache if cache is not None else past_key_values  # the keyword was renamed in transformers 5.x
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings  # [batch, tokens, head_dim]
        query, key = self.rotate(query, cos, sin).transpose(1, 2), self.rotate(key, cos, sin).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # Fused attention kernels (CPU and GPU flash) need one head dim for q, k and v; with two, torch
        # falls back to a kernel 10x slower. Zero dims change neither the logits nor the kept outputs,
        # and the cache above keeps the narrow tensors.
        width = max(self.qk_head_dim, self.v_head_dim)
        if self.qk_head_dim < width:
            query, key = pad_last(query, width), pad_last(key, width)
        if self.v_head_dim < width:
            value = pad_last(value, width)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(output[..., : self.v_head_dim].reshape(*input_shape, -1).contiguous()), weights


def slice_mlp(mlp: nn.Module, intermediate_size: int) -> None:
    """Give a Llama-family MLP ``intermediate_size`` neurons (new, uninitialised projections)."""
    for name, shape in (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in")):
        old = getattr(mlp, name)
        inputs, outputs = (
            (old.in_features, intermediate_size) if shape == "out" else (intermediate_size, old.out_features)
        )
        setattr(
            mlp,
            name,
            nn.Linear(inputs, outputs, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype),
        )


def slice_layers(model: nn.Module, spec: dict) -> None:
    """Resize every decoder layer of a stock model as ``spec`` (the config's ``modegpt``) says."""
    for layer, sizes in zip(model.model.layers, spec["layers"], strict=True):
        layer.self_attn = SlicedAttention(
            layer.self_attn, sizes["qk_head_dim"], sizes["v_head_dim"], sizes["rope_pairs"]
        )
        slice_mlp(layer.mlp, sizes["intermediate_size"])


class SlicedLayers:
    """Mixed in before a stock causal LM: builds it, then resizes its layers as ``config.modegpt`` says."""

    def __init__(self, config):
        super().__init__(config)
        slice_layers(self, config.modegpt)


class ModeGPTLlamaConfig(LlamaConfig):
    model_type = "modegpt_llama"


class ModeGPTLlamaForCausalLM(SlicedLayers, LlamaForCausalLM):
    config_class = ModeGPTLlamaConfig


class ModeGPTMistralConfig(MistralConfig):
    model_type = "modegpt_mistral"


class ModeGPTMistralForCausalLM(SlicedLayers, MistralForCausalLM):
    config_class = ModeGPTMistralConfig


class ModeGPTQwen2Config(Qwen2Config):
    model_type = "modegpt_qwen2"


class ModeGPTQwen2ForCausalLM(SlicedLayers, Qwen2ForCausalLM):
    config_class = ModeGPTQwen2Config


class ModeGPTQwen3Config(Qwen3Config):
    model_type = "modegpt_qwen3"


class ModeGPTQwen3ForCausalLM(SlicedLayers, Qwen3ForCausalLM):
    config_class = ModeGPTQwen3Config
