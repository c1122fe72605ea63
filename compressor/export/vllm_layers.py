"""The layers vLLM serves a checkpoint's linears as, by name: what its per-module rules are matched against.

vLLM stacks some checkpoint linears into one layer (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``, a
block's experts into one ``FusedMoE``) and names that layer, not the checkpoint's modules, when it looks up a
module's quantization (GPTQ ``dynamic`` rules: ``export/gptq.py``; compressed-tensors config groups, whose
members of one fused layer must agree: ``compressor/serving.py``). Light: no torch, so ``compressor check`` reads
configs without it.
"""

from __future__ import annotations

import re

# The layers vLLM builds from several checkpoint linears, from its models' ``packed_modules_mapping``
# (vllm/model_executor/models/llama.py and the families built like it: qkv_proj, gate_up_proj; deepseek_v2.py:
# fused_qkv_a_proj), and the one MoE layer (``FusedMoE``) holding every expert of a block, named after the
# checkpoint's experts module (``model.layers.3.mlp.experts``, Mixtral's ``...block_sparse_moe.experts``).
# vLLM matches ``dynamic`` rules against these names, GPTQModel against the checkpoint's.
VLLM_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}
EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.\d+\.[^.]+$")


def vllm_layer(name: str) -> str:
    """The vLLM layer serving the checkpoint's linear ``name``: ``model.layers.0.self_attn.k_proj`` ->
    ``model.layers.0.self_attn.qkv_proj``, ``model.layers.0.mlp.experts.3.up_proj`` -> ``model.layers.0.mlp.experts``;
    a linear vLLM does not fuse is its own layer."""
    expert = EXPERT.match(name)
    if expert:
        return expert["layer"]
    parent, _, leaf = name.rpartition(".")
    fused = next((layer for layer, parts in VLLM_FUSED.items() if leaf in parts), None)
    return f"{parent}.{fused}" if fused is not None and parent else name
