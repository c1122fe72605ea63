"""Architecture adapters: where each decoder-only family keeps its blocks, projections and norms.

Per-architecture knowledge is a row in ``ADAPTERS``, not code: the Llama family of transformers
models (Llama, Mistral, Qwen2, Qwen3) shares module names, and differs only in q/k/v biases (Qwen2)
and per-head q/k RMSNorms (Qwen3). Other families are rows too, with the fields where they differ:
norms after the sublayers (Gemma 2/3, OLMo 2, GLM-4), linears reading the residual stream with no norm
(``raw_inputs``: OLMo 2), one norm feeding attention and MLP in parallel (Cohere), fused projections
kept under the checkpoint's own names (``fused``: Phi-3's ``qkv_proj`` and ``gate_up_proj``), logits
soft-capped or scaled after the LM head, and ``differs``: in words, how the block differs from Llama's
(what structural steps that assume a Llama block are refused on, ``compressor.methods``). A decoder
with no row is read through ``arch/generic.py``: an adapter derived from its module tree and accepted
only when a probe forward confirms it. Decoder blocks are found through these paths and their inputs
captured with hooks, so nothing is traced with torch.fx.

The architecture channel: an adapter also says which linears read which norm's output
(``norm_linear_groups``: what a transform folding into a norm must change together; ``linear_channel_links``:
which linear's outputs another reads channel by channel), where a
block's attention and MLP modules are, and which projections produce what the KV cache holds. A
step that changes the architecture does not edit the model handle: it declares an
``ExportArchitecture`` (the new config, and modeling code the writer ships beside the weights
with ``auto_map`` where transformers has no class for it) through its context. Each such architecture
is a package beside this file (``deepseek_mla``, ``swiftkv``, ``modegpt``: config builders and shipped
modeling code) and a row in ``shipped.SHIPPED``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.arch.shipped import SHIPPED, shipped_for
from compressor.errors import UserError

LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ATTENTION_LINEARS = {role: path for role, path in LLAMA_LINEARS.items() if path.startswith("self_attn.")}


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family keeps its experts and what the checkpoint calls them (an ``ArchAdapter`` field)."""

    experts: str = "mlp.experts"  # the fused experts module, path in the block
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # checkpoint names: gate, up, down
    routers: tuple[str, ...] = ("mlp.gate",)  # never quantized (paths in the block)
    num_experts: str = "num_experts"  # config attributes
    intermediate_size: str = "moe_intermediate_size"
    # (in-memory fragment, checkpoint fragment): Mixtral's checkpoints say block_sparse_moe where transformers says mlp
    checkpoint_renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    linears: dict = field(default_factory=lambda: dict(LLAMA_LINEARS))
    norms: dict = field(
        default_factory=lambda: {"input": "input_layernorm", "post_attention": "post_attention_layernorm"}
    )
    qk_norms: dict = field(default_factory=dict)
    # which linears (roles) read each norm's output (norm role): what a norm-folding transform changes together
    norm_inputs: dict = field(default_factory=lambda: {"input": ("q", "k", "v"), "post_attention": ("gate", "up")})
    # linear (role) -> the linear whose input channels are its output channels through per-channel operations only
    # (attention's weighted sum of values, repeated over a KV group; the SwiGLU product): a per-channel scale of
    # the second's inputs folds into the first's outputs (AWQ)
    channel_links: dict = field(default_factory=lambda: {"v": "o", "up": "down"})
    attention: str = "self_attn"  # the block's attention module (the KV cache lives in its forward)
    mlp: str = "mlp"
    kv_cache: tuple[str, ...] = ("k", "v")  # projections whose outputs (keys after RoPE, values) the KV cache holds
    # Layers that serving engines fuse (qkv_proj, gate_up_proj) must share one quantization scheme.
    fused_groups: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))
    # --- where a family differs from Llama (each defaults to Llama's) ---
    raw_inputs: tuple[tuple[str, ...], ...] = ()  # roles reading the residual stream itself, each group one input
    fused: dict = field(default_factory=dict)  # a fused projection's role -> the roles it stacks by rows, in order
    logit_softcap: str | None = None  # config key: logits = cap * tanh(logits / cap) after the LM head
    logit_scale: str | None = None  # config key: logits times it
    logit_divisor: str | None = None  # config key: logits divided by it
    config_requires: dict = field(default_factory=dict)  # config key -> value this row assumes (else: generic)
    differs: tuple[str, ...] = ()  # how its block differs from Llama's, in words (support matrix, refusals)
    generic: bool = False  # derived from the module tree and confirmed by a probe (arch/generic.py), not a row
    # Mixture-of-experts families: where the experts are and what the checkpoint calls them (compressor/moe.py)
    experts: ExpertLayout | None = None


GEMMA_NORMS = {
    "input": "input_layernorm",
    "post_attention": "post_attention_layernorm",  # on the attention's output, before the residual add
    "pre_feedforward": "pre_feedforward_layernorm",
    "post_feedforward": "post_feedforward_layernorm",
}
GEMMA_NORM_INPUTS = {"input": ("q", "k", "v"), "pre_feedforward": ("gate", "up")}
GEMMA_DIFFERS = (
    "(1 + w) RMSNorms, also after attention and MLP",
    "embeddings scaled by sqrt(hidden)",
    "GELU MLP",
    "sliding-window layers",
)
QK_NORMS = {"q": "self_attn.q_norm", "k": "self_attn.k_norm"}
FUSED_LINEARS = {
    "qkv": "self_attn.qkv_proj",
    "o": "self_attn.o_proj",
    "gate_up": "mlp.gate_up_proj",
    "down": "mlp.down_proj",
}


def moe_adapter(family: str, experts: ExpertLayout, **fields) -> ArchAdapter:
    """A MoE family: the canonical linears are attention's (a block's MLP is experts, or a dense MLP in
    DeepSeek's first layers: both are found as the block's other linears)."""
    defaults = dict(
        linears=dict(ATTENTION_LINEARS), norm_inputs={"input": ("q", "k", "v")}, fused_groups=(("q", "k", "v"),)
    )
    differs = ("mixture-of-experts MLPs", *fields.pop("differs", ()))
    return ArchAdapter(family, (family,), **(defaults | fields), experts=experts, differs=differs)


ADAPTERS = (
    ArchAdapter("llama", ("llama",)),
    ArchAdapter("mistral", ("mistral",), differs=("sliding-window attention (some checkpoints)",)),
    ArchAdapter("qwen2", ("qwen2",), differs=("q/k/v biases",)),
    ArchAdapter(
        "qwen3",
        ("qwen3",),
        qk_norms={"q": "self_attn.q_norm", "k": "self_attn.k_norm"},
        differs=("per-head q/k norms",),
    ),
    ArchAdapter(
        "gemma2",
        ("gemma2",),
        norms=GEMMA_NORMS,
        norm_inputs=GEMMA_NORM_INPUTS,
        logit_softcap="final_logit_softcapping",
        differs=GEMMA_DIFFERS + ("soft-capped attention scores and logits",),
    ),
    ArchAdapter(
        "gemma3_text",
        ("gemma3_text",),
        norms=GEMMA_NORMS,
        norm_inputs=GEMMA_NORM_INPUTS,
        qk_norms=QK_NORMS,
        logit_softcap="final_logit_softcapping",
        differs=GEMMA_DIFFERS + ("per-head q/k norms", "local and global rotary bases"),
    ),
    ArchAdapter(
        "phi3",
        ("phi3",),
        linears=FUSED_LINEARS,
        norm_inputs={"input": ("qkv",), "post_attention": ("gate_up",)},
        fused={"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")},
        kv_cache=("qkv",),
        fused_groups=(),
        differs=("fused qkv_proj and gate_up_proj", "partial rotary (some checkpoints)"),
    ),
    ArchAdapter(
        "olmo2",
        ("olmo2",),
        norms={"post_attention": "post_attention_layernorm", "post_feedforward": "post_feedforward_layernorm"},
        norm_inputs={},
        raw_inputs=(("q", "k", "v"), ("gate", "up")),
        qk_norms=QK_NORMS,
        differs=("norms after attention and MLP only (none before)", "q/k RMSNorms over all heads"),
    ),
    ArchAdapter(
        "granite",
        ("granite",),
        logit_divisor="logits_scaling",
        differs=("multipliers on embeddings, residuals, attention scores and logits",),
    ),
    ArchAdapter(
        "glm4",
        ("glm4",),
        linears={**{r: p for r, p in LLAMA_LINEARS.items() if r not in ("gate", "up")}, "gate_up": "mlp.gate_up_proj"},
        norms={
            "input": "input_layernorm",
            "post_self_attn": "post_self_attn_layernorm",  # on the attention's output
            "post_attention": "post_attention_layernorm",  # before the MLP
            "post_mlp": "post_mlp_layernorm",
        },
        norm_inputs={"input": ("q", "k", "v"), "post_attention": ("gate_up",)},
        fused={"gate_up": ("gate", "up")},
        fused_groups=(("q", "k", "v"),),
        differs=("fused gate_up_proj", "norms after attention and MLP too", "partial rotary, interleaved"),
    ),
    ArchAdapter(
        "cohere",
        ("cohere",),
        norms={"input": "input_layernorm"},
        norm_inputs={"input": ("q", "k", "v", "gate", "up")},
        logit_scale="logit_scale",
        differs=("LayerNorms (no bias)", "attention and MLP in parallel from one norm", "interleaved rotary"),
    ),
    ArchAdapter(
        "stablelm",
        ("stablelm",),
        config_requires={"use_parallel_residual": False},
        differs=("LayerNorms with biases", "partial rotary"),
    ),
    moe_adapter(
        "mixtral",
        ExpertLayout(
            projections=("w1", "w3", "w2"),
            num_experts="num_local_experts",
            intermediate_size="intermediate_size",
            checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
        ),
    ),
    # shared experts (Qwen2-MoE's shared_expert, DeepSeek's shared_experts) are dense MLPs: quantized as other linears
    moe_adapter("qwen2_moe", ExpertLayout(routers=("mlp.gate", "mlp.shared_expert_gate"))),
    moe_adapter("qwen3_moe", ExpertLayout(), qk_norms={"q": "self_attn.q_norm", "k": "self_attn.k_norm"}),
    # Multi-head latent attention (q_a/q_b or q, kv_a_proj_with_mqa, kv_b, o): no q/k/v roles
    moe_adapter(
        "deepseek_v3",
        ExpertLayout(num_experts="n_routed_experts"),
        linears={"o": "self_attn.o_proj"},
        norm_inputs={},
        fused_groups=(),
        kv_cache=(),
    ),
)


class UnsupportedArchitecture(UserError):
    pass


def adapter_for(config) -> ArchAdapter:
    """The adapter of ``config``'s family; a shipped architecture (``arch/shipped.py``) is read through its
    base family's (whether it can be compressed again is ``ShippedArchitecture.compressible``). A family
    with no row (or a config its row does not assume) raises ``UnsupportedArchitecture``: the caller may
    then try ``arch.generic`` on the model."""
    model_type = getattr(config, "model_type", None)
    shipped = shipped_for(model_type)
    if shipped is not None:
        model_type = shipped.model_types[model_type]
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            wrong = {
                k: getattr(config, k, None) for k, v in adapter.config_requires.items() if getattr(config, k, v) != v
            }
            if wrong:
                raise UnsupportedArchitecture(
                    f"{model_type} with {', '.join(f'{k}={v}' for k, v in wrong.items())} is not the layout its "
                    f"adapter assumes ({', '.join(f'{k}={v}' for k, v in adapter.config_requires.items())})"
                )
            return adapter
    again = [t for a in SHIPPED if a.compressible for t in a.model_types]
    supported = ", ".join(a.model_types[0] for a in ADAPTERS) + f" (and our exports {', '.join(again)})"
    raise UnsupportedArchitecture(f"model_type '{model_type}' is not supported; supported: {supported}")


def norm_linear_groups(adapter: ArchAdapter) -> dict[str, tuple[str, ...]]:
    """Norm path in the block -> paths of the linears that read its output (QLLM, SmoothQuant-like folds)."""
    return {
        adapter.norms[norm]: tuple(adapter.linears[role] for role in roles)
        for norm, roles in adapter.norm_inputs.items()
    }


def linear_channel_links(adapter: ArchAdapter) -> dict[str, str]:
    """Linear path in the block -> path of the linear reading its output channels one to one (``channel_links``)."""
    return {adapter.linears[first]: adapter.linears[second] for first, second in adapter.channel_links.items()}


def input_groups(adapter: ArchAdapter) -> list[tuple[str, ...]]:
    """Paths of the linears that read one same input, group by group: each norm's readers, then those reading
    the residual stream itself (``raw_inputs``). GPTQ takes their Hessians together; QLLM reassembles them."""
    return list(norm_linear_groups(adapter).values()) + [
        tuple(adapter.linears[role] for role in roles) for roles in adapter.raw_inputs
    ]


def final_logits(adapter: ArchAdapter, config, logits):
    """What the family's causal LM does to the LM head's output: soft-capping (Gemma 2/3), a scale (Cohere)
    or a divisor (Granite)."""
    if adapter.logit_scale is not None:
        logits = logits * getattr(config, adapter.logit_scale)
    if adapter.logit_divisor is not None:
        logits = logits / getattr(config, adapter.logit_divisor)
    cap = getattr(config, adapter.logit_softcap, None) if adapter.logit_softcap is not None else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def projection_weight(adapter: ArchAdapter, block: nn.Module, role: str, config):
    """The weight (dense, or the quantized one dequantized) of projection ``role`` of ``block``; a role inside a
    fused projection (Phi-3's ``k`` in ``qkv_proj``) is its rows there."""
    fused = next((name for name, parts in adapter.fused.items() if role in parts), None)
    module = block.get_submodule(adapter.linears[fused or role])
    weight = module.quantized_weight.dequantize(torch.float32) if hasattr(module, "quantized_weight") else module.weight
    if fused is None:
        return weight
    geometry = attention_geometry(config)
    sizes = {
        "q": geometry.num_heads * geometry.head_dim,
        "k": geometry.num_kv_heads * geometry.head_dim,
        "v": geometry.num_kv_heads * geometry.head_dim,
    }
    parts = adapter.fused[fused]
    rows = [sizes.get(part, weight.shape[0] // len(parts)) for part in parts]
    return weight.split(rows)[parts.index(role)]


@dataclass
class ExportArchitecture:
    """What an export declares when a step changed the architecture.

    ``config`` replaces the input's config in ``config.json``; ``modeling_files`` (file name ->
    Python source) are written beside the weights and ``auto_map`` (e.g. ``{"AutoModelForCausalLM":
    "modeling_x.XForCausalLM"}``) is set in the config, so transformers loads the checkpoint with
    ``trust_remote_code=True``. Both come from the config's row in ``shipped.SHIPPED`` (``declared``)."""

    config: object
    modeling_files: dict[str, str] = field(default_factory=dict)
    auto_map: dict[str, str] = field(default_factory=dict)

    @classmethod
    def declared(cls, config) -> ExportArchitecture:
        """The export of ``config``, whose ``model_type`` must be a row of ``shipped.SHIPPED``."""
        shipped = shipped_for(config.model_type)
        if shipped is None:
            raise ValueError(
                f"model_type {config.model_type!r} is not a shipped architecture (compressor/arch/shipped.py)"
            )
        return cls(config, shipped.modeling_sources(), shipped.auto_map(config.model_type))


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_geometry(config) -> AttentionGeometry:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionGeometry(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def block_linears(adapter: ArchAdapter, block: nn.Module) -> dict[str, nn.Module]:
    """The canonical projections of one block (dense or already quantized), keyed by path in the block,
    then any other linear a step added beside them (SwiftKV's ``*_swiftkv`` projections).

    A block whose layout a step changed (TransMLA's latent attention) has other projections: then
    every linear layer it holds (``nn.Linear`` or one with ``in_features`` and ``out_features``, as
    quantized linears have), in module order."""
    modules = dict(block.named_modules())
    missing = [path for path in adapter.linears.values() if path not in modules]
    linears = {
        path: module
        for path, module in modules.items()
        if (
            isinstance(module, nn.Linear)
            or (hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "tensor_names"))
        )
        and not (adapter.experts is not None and path in adapter.experts.routers)  # routers stay as they are
    }
    if not missing:
        canonical = {path: modules[path] for path in adapter.linears.values()}
        return canonical | {path: module for path, module in linears.items() if path not in canonical}
    if not linears:
        raise UnsupportedArchitecture(f"{adapter.family} block has no module at {', '.join(missing)}")
    return linears
