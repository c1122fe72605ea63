"""FP8 KV cache: calibrated static per-layer scales for an E4M3 key/value cache (``kvcache/fp8.py``).

No paper: the scheme vLLM serves with ``kv_cache_dtype="fp8"`` and llm-compressor calibrates (its
``kv_cache_scheme``: float, 8 bits, per tensor, symmetric, static). Per attention layer the step runs the block on
the calibration inputs with a recording cache that sees the keys after RoPE and the values, and sets
``k_scale = amax(keys) / 448`` and ``v_scale = amax(values) / 448`` (min-max, llm-compressor's default observer;
448 is E4M3's largest value). The scales become buffers of the attention module (``<layer>.self_attn.k_scale``,
the names vLLM reads) and the export declares the cache (``kv_cache: {method: fp8}``), so our loaders and
transformers after ``import compressor`` run the model with it. Defaults: keys and values both in FP8, the prompt
included (``quantize_fresh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compressor.kvcache.fp8 import FP8CacheSpec, quantize_e4m3
from compressor.step import Step, param, register_step
from compressor.weights.values import E4M3_MAX, e4m3_values

if TYPE_CHECKING:
    from compressor.context import BlockContext


class AmaxRecorder:
    """Stands in for the cache during a block's forward: the largest |key| and |value| it is handed."""

    def __init__(self):
        self.amax = {"k": 0.0, "v": 0.0}
        self.sample: dict[str, list[torch.Tensor]] = {"k": [], "v": []}

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        for name, states in (("k", key_states), ("v", value_states)):
            self.amax[name] = max(self.amax[name], float(states.detach().abs().amax()))
            self.sample[name].append(states.detach().float().cpu())
        return key_states, value_states


def record_kv(block, inputs: list[torch.Tensor], block_kwargs: list[dict]) -> AmaxRecorder:
    recorder = AmaxRecorder()
    with torch.no_grad():
        for hidden, kwargs in zip(inputs, block_kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            block(hidden, **{**rest, "cache": recorder, "use_cache": True})
    return recorder


def e4m3_relative_error(states: torch.Tensor, scale: torch.Tensor) -> float:
    restored = e4m3_values(quantize_e4m3(states, scale)) * scale
    return float((restored - states).norm() / states.norm().clamp(min=1e-30))


@register_step("fp8_kv")
@dataclass
class FP8KVCache(Step):
    """FP8 E4M3 KV cache with calibrated static scales per attention layer (vLLM's fp8 KV cache)."""

    values: bool = param(True, "store the values in FP8 too (false: keys only)")
    quantize_fresh: bool = param(True, "tokens of the current forward (the prompt) attend to their own FP8 entries")

    declares_kv_cache = True
    distributes = "ranges"  # several processes: the key and value maxima are all-reduced (max)

    @property
    def cache_spec(self) -> FP8CacheSpec:
        return FP8CacheSpec(values=self.values, quantize_fresh=self.quantize_fresh)

    def check_model(self, linears: dict) -> None:
        if not any(name.endswith("self_attn.k_proj") for name in linears):
            raise ValueError(
                "values: the FP8 KV cache needs attention with a k_proj whose keys are cached after RoPE (Llama, "
                "Mistral, Qwen2, Qwen3); this model's blocks have none"
            )

    def compress_block(self, context: BlockContext) -> None:
        if context.index == 0:
            context.declare_kv_cache(self.cache_spec)
        recorder = record_kv(context.block, context.inputs, context.block_kwargs)
        amax = context.run.distributed.all_reduce_max(
            torch.tensor([recorder.amax["k"], recorder.amax["v"]], dtype=torch.float64)
        )
        recorder.amax = dict(zip(("k", "v"), amax.tolist()))
        numbers = {}
        for name in ("k", "v"):
            scale = torch.tensor([max(recorder.amax[name], 1e-12) / E4M3_MAX], dtype=torch.float32)
            context.attach_tensor(context.adapter.attention, f"{name}_scale", scale)
            states = torch.cat([s.flatten() for s in recorder.sample[name]])
            numbers[f"{name}_scale"] = float(scale)
            numbers[f"{name}_error"] = e4m3_relative_error(states, scale)
        context.record(f"{context.adapter.attention}.kv_cache", **numbers)
