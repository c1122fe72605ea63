"""Architecture adapters: where each decoder-only family keeps its blocks, projections and norms.

Per-architecture knowledge is a row in ``ADAPTERS``, not code: the Llama family of transformers
models (Llama, Mistral, Qwen2, Qwen3) shares module names, and differs only in q/k/v biases (Qwen2)
and per-head q/k RMSNorms (Qwen3). Decoder blocks are found through these paths and their inputs
captured with hooks, so nothing is traced with torch.fx.

The architecture channel: an adapter also says which linears read which norm's output
(``norm_linear_groups``: what a transform folding into a norm must change together), where a
block's attention and MLP modules are, and which projections produce what the KV cache holds. A
step that changes the architecture does not edit the model handle: it declares an
``ExportArchitecture`` (the new config, and modeling code the writer ships beside the weights
with ``auto_map`` where transformers has no class for it) through its context. Each such architecture
is a package beside this file (``deepseek_mla``, ``swiftkv``, ``modegpt``: config builders and shipped
modeling code) and a row in ``shipped.SHIPPED``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compressor.arch.shipped import SHIPPED, shipped_for
from compressor.errors import UserError
from compressor.moe import ExpertLayout

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
    attention: str = "self_attn"  # the block's attention module (the KV cache lives in its forward)
    mlp: str = "mlp"
    kv_cache: tuple[str, ...] = ("k", "v")  # projections whose outputs (keys after RoPE, values) the KV cache holds
    # Layers that serving engines fuse (qkv_proj, gate_up_proj) must share one quantization scheme.
    fused_groups: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))
    # Mixture-of-experts families: where the experts are and what the checkpoint calls them (compressor/moe.py)
    experts: ExpertLayout | None = None


def moe_adapter(family: str, experts: ExpertLayout, **fields) -> ArchAdapter:
    """A MoE family: the canonical linears are attention's (a block's MLP is experts, or a dense MLP in
    DeepSeek's first layers: both are found as the block's other linears)."""
    defaults = dict(
        linears=dict(ATTENTION_LINEARS), norm_inputs={"input": ("q", "k", "v")}, fused_groups=(("q", "k", "v"),)
    )
    return ArchAdapter(family, (family,), **(defaults | fields), experts=experts)


ADAPTERS = (
    ArchAdapter("llama", ("llama",)),
    ArchAdapter("mistral", ("mistral",)),
    ArchAdapter("qwen2", ("qwen2",)),
    ArchAdapter("qwen3", ("qwen3",), qk_norms={"q": "self_attn.q_norm", "k": "self_attn.k_norm"}),
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
    base family's (whether it can be compressed again is ``ShippedArchitecture.compressible``)."""
    model_type = getattr(config, "model_type", None)
    shipped = shipped_for(model_type)
    if shipped is not None:
        model_type = shipped.model_types[model_type]
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
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
