"""TransMLA: grouped-query attention rewritten as DeepSeek-V3 multi-head latent attention (MLA).

Paper: Meng et al., "TransMLA: Multi-head Latent Attention Is All You Need", arXiv 2502.07864;
official code fxmeng/TransMLA. A layer step; per block, from one Gram matrix of the keys and values
on calibration inputs: (1) GQA is MLA (exact); (2) RoRoPE + FreqFold: a PCA across kv heads per group
of frequencies keeps RoPE on ``qk_rope_head_dim`` key dims; (3) a key/value-balanced joint PCA
truncated to ``kv_lora_rank``; (4) the DeepSeek-V3 layout, whose ``kv_a_layernorm`` is fitted by least
squares (the one approximation at full rank). The converted attention is transformers'
``DeepseekV3Attention``; the step declares the DeepSeek-V3 config (``arch/deepseek_mla``), so the
export loads as ``DeepseekV3ForCausalLM``. ``transmla_heal`` then distils the converted model towards
the original (``distill.train_end_to_end``; only the attention by default).

The default layout is the servable one (transformers and, at sizes it accepts, vLLM). ``exact: true``
(our construction) keeps RoPE on every key dim of every kv head and puts the latent in the linear range
of ``kv_a_layernorm``: at ``kv_cache_ratio: 1.0`` the stock export is the original; transformers only.

Defaults: ``kv_cache_ratio: 0.25``; ``qk_rope_head_dim`` the largest divisor of head_dim within half
the cache budget; ``freqfold`` 2 x head_dim / qk_rope_head_dim. Refused: a query bias, Qwen3's k_norm,
sliding windows, RoPE scaling, MLP biases. Deviations and measured numbers: docs/methods/transmla.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from compressor.arch import UnsupportedArchitecture, attention_geometry
from compressor.arch.deepseek_mla import deepseek_v3_config
from compressor.distill import check_top_k, train_end_to_end
from compressor.step import Step, param, register_step

if TYPE_CHECKING:
    from compressor.context import BlockContext, ModelContext

# ----------------------------------------------------------------------------------------------
# Math on tensors


def damped_eigh(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of ``gram + damp * mean(diag)``, largest first (float64)."""
    gram = gram + damp * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def rorope_rotation(
    key_gram: torch.Tensor, num_kv_heads: int, head_dim: int, rope_dim: int, freqfold: int, damp: float = 0.01
):
    """RoRoPE with FreqFold: an orthogonal ``T`` [L0, L0] (L0 = num_kv_heads * head_dim) taking the
    keys (kv-head-major, half-split rotary layout) to ``[rotary part (rope_dim, interleaved pairs) |
    position-free part]``, the original frequency index of each rotary pair, and the share of key
    energy the rotary part holds.

    Group ``g`` pools frequencies ``g*ff .. g*ff+ff-1`` of every kv head; its PCA components are
    planes (the same vector applied to the real and the imaginary coordinates), so with ``ff = 1``
    ``T`` commutes with RoPE and keeping RoPE on every plane is exact."""
    half = head_dim // 2
    groups = half // freqfold
    per_group = rope_dim * freqfold // head_dim  # rotary planes kept per group
    width = num_kv_heads * freqfold
    latent = num_kv_heads * head_dim
    rotation = key_gram.new_zeros(latent, latent)
    frequencies, kept, total = [], 0.0, 0.0
    nope_row = rope_dim
    for g in range(groups):
        local = torch.arange(freqfold, device=key_gram.device) + g * freqfold
        real = (torch.arange(num_kv_heads, device=key_gram.device)[:, None] * head_dim + local).reshape(-1)
        imag = real + half
        gram = key_gram[real][:, real] + key_gram[imag][:, imag]
        values, vectors = damped_eigh(gram, damp)
        kept += values[:per_group].sum().item()
        total += values.sum().item()
        for p in range(width):
            if p < per_group:
                pair = g * per_group + p
                row_re, row_im = 2 * pair, 2 * pair + 1
                frequencies.append(g * freqfold + (p * freqfold) // per_group)
            else:
                row_re, row_im = nope_row, nope_row + 1
                nope_row += 2
            rotation[row_re, real] = vectors[:, p]
            rotation[row_im, imag] = vectors[:, p]
    return rotation, torch.tensor(frequencies, dtype=torch.long), kept / total


def kv_up_slices(num_heads: int, num_kv_heads: int, head_dim: int) -> list[slice]:
    """The latent rows query head ``h`` reads: those of its kv head (GQA as MLA, stage 1)."""
    group = num_heads // num_kv_heads
    return [slice((h // group) * head_dim, (h // group + 1) * head_dim) for h in range(num_heads)]


@dataclass
class MLAWeights:
    q_weight: torch.Tensor  # [n_h (d + r), D]
    q_bias: torch.Tensor | None
    kv_a_weight: torch.Tensor  # [R_kv + r, D]
    kv_a_bias: torch.Tensor | None
    kv_b_weight: torch.Tensor  # [n_h (d + d), R_kv]
    rope_frequencies: torch.Tensor  # [r / 2] index into the source's rotary frequencies
    rope_energy: float  # share of key energy in the rotary part
    kv_energy: float  # share of the position-free key + value energy the latent keeps
    alpha: float


def transmla_weights(
    q_weight,
    q_bias,
    k_weight,
    k_bias,
    v_weight,
    v_bias,
    kv_gram,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_dim: int,
    freqfold: int,
    kv_lora_rank: int,
    balance_kv: bool = True,
    damp: float = 0.01,
) -> MLAWeights:
    """The MLA projections of one GQA attention from its weights and the Gram of its ``[k | v]``
    outputs (biases included) on calibration inputs. Everything is computed in float64."""
    f64, dtype = torch.float64, q_weight.dtype
    d, r, latent = head_dim, rope_dim, num_kv_heads * head_dim
    q_weight, k_weight, v_weight = q_weight.to(f64), k_weight.to(f64), v_weight.to(f64)
    # biases ride along as an extra input column
    k_full = torch.cat([k_weight, k_bias.to(f64)[:, None]], 1) if k_bias is not None else k_weight
    v_full = torch.cat([v_weight, v_bias.to(f64)[:, None]], 1) if v_bias is not None else v_weight
    kv_gram = kv_gram.to(f64)

    rotation, frequencies, rope_energy = rorope_rotation(kv_gram[:latent, :latent], num_kv_heads, d, r, freqfold, damp)
    t_rope, t_nope = rotation[:r], rotation[r:]
    mix, basis, alpha, kv_energy = balanced_joint_pca(kv_gram, t_nope, latent, r, kv_lora_rank, balance_kv, damp)

    down = basis.T @ mix @ torch.cat([k_full, v_full])  # [R_kv, D (+1)]
    rope_rows = t_rope @ k_full  # [r, D (+1)]
    kv_a = torch.cat([down, rope_rows])

    scale = math.sqrt((d + r) / d)
    q_rows, q_bias_rows, kv_b_rows = deepseek_head_rows(
        q_weight, q_bias, t_rope, t_nope, basis, alpha, num_heads, num_kv_heads, d
    )

    has_kv_bias = k_bias is not None or v_bias is not None
    return MLAWeights(
        q_weight=(torch.cat(q_rows) * scale).to(dtype),
        q_bias=(torch.cat(q_bias_rows) * scale).to(dtype) if q_bias is not None else None,
        kv_a_weight=kv_a[:, : q_weight.shape[1]].to(dtype),
        kv_a_bias=kv_a[:, -1].to(dtype) if has_kv_bias else None,
        kv_b_weight=torch.cat(kv_b_rows).to(dtype),
        rope_frequencies=frequencies,
        rope_energy=rope_energy,
        kv_energy=kv_energy,
        alpha=alpha,
    )


def balanced_joint_pca(
    kv_gram: torch.Tensor,
    t_nope: torch.Tensor,
    latent: int,
    rope_dim: int,
    kv_lora_rank: int,
    balance_kv: bool,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Stage 3 on the float64 Gram of ``[k | v]``: the position-free key part, divided by ``alpha`` (mean
    key column norm / mean value column norm on calibration data), and the values factored together.
    Returns the map ``mix`` ([k | v] -> [k_nope / alpha | v]), the top-``kv_lora_rank`` basis of the
    joint Gram, ``alpha`` and the share of the joint energy the basis keeps."""
    f64 = torch.float64
    nope_gram = t_nope @ kv_gram[:latent, :latent] @ t_nope.T
    alpha = 1.0
    if balance_kv and latent > rope_dim:
        key_norm = nope_gram.diagonal().clamp_min(0).sqrt().mean()
        alpha = (key_norm / kv_gram[latent:, latent:].diagonal().clamp_min(0).sqrt().mean()).item()
    identity = torch.eye(latent, dtype=f64, device=t_nope.device)
    mix = torch.block_diag(t_nope / alpha, identity)  # [k|v] -> [k_nope/alpha | v]
    joint_gram = mix @ kv_gram @ mix.T
    values, vectors = damped_eigh(joint_gram, damp)
    basis = vectors[:, :kv_lora_rank]  # [2 L0 - r, R_kv]
    kv_energy = (values[:kv_lora_rank].sum() / values.sum()).item()
    return mix, basis, alpha, kv_energy


def deepseek_head_rows(
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    t_rope: torch.Tensor,
    t_nope: torch.Tensor,
    basis: torch.Tensor,
    alpha: float,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
):
    """Stage 4, per query head (float64): its query rows ``[q_h | rotary latent read by head h applied to
    q_h]`` (and bias rows), and its ``kv_b_proj`` rows ``[k_nope | v]``, unscaled."""
    d = head_dim
    r = t_rope.shape[0]
    latent = num_kv_heads * d
    q_heads = q_weight.reshape(num_heads, d, -1)
    q_bias_heads = q_bias.to(torch.float64).reshape(num_heads, d) if q_bias is not None else None
    q_rows, q_bias_rows, kv_b_rows = [], [], []
    nope_basis, value_basis = basis[: latent - r], basis[latent - r :]
    for h, rows in enumerate(kv_up_slices(num_heads, num_kv_heads, d)):
        read_rope = t_rope[:, rows]  # [r, d]: the rotary latent as seen by head h
        q_rows += [q_heads[h], read_rope @ q_heads[h]]
        if q_bias_heads is not None:
            q_bias_rows += [q_bias_heads[h], read_rope @ q_bias_heads[h]]
        kv_b_rows += [alpha * t_nope[:, rows].T @ nope_basis, value_basis[rows]]
    return q_rows, q_bias_rows, kv_b_rows


def linear_range_scale(latents: list[torch.Tensor], eps: float, error: float = 1e-7, distributed=None) -> float:
    """The factor ``s`` that puts the latents where an RMSNorm is linear: ``s * c / sqrt(s^2 mean(c^2)
    + eps)`` is ``s * c / sqrt(eps)`` to within ``error`` (relative) on every calibration latent, so
    DeepSeek-V3's ``kv_a_layernorm`` with weight ``sqrt(eps) / s`` returns ``c`` itself. The rows of
    ``kv_a_proj_with_mqa`` that make the latent are multiplied by ``s``; float32 and bfloat16 hold
    such small numbers at full relative precision (float16 does not). With ``distributed``: every rank's latents."""
    largest = max(latent.double().pow(2).mean(-1).max().item() for latent in latents)
    if distributed is not None:
        largest = float(distributed.all_reduce_max(torch.tensor([largest], dtype=torch.float64)))
    return math.sqrt(2 * error * eps / max(largest, 1e-30))


def latent_norm_error(
    latents: list[torch.Tensor], weight: torch.Tensor, eps: float, scale: float = 1.0, distributed=None
) -> float:
    """Relative error of the latent norm against the identity: ``|| weight * norm(s c) - c || / || c ||``
    over the calibration latents (0 for an exact conversion; with ``distributed``, every rank's)."""
    error = total = 0.0
    for latent in latents:
        c = latent.reshape(-1, latent.shape[-1]).double()
        scaled = c * scale
        normed = weight.double() * scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + eps)
        error += (normed - c).pow(2).sum().item()
        total += c.pow(2).sum().item()
    if distributed is not None:
        error, total = distributed.all_reduce_sum(torch.tensor([error, total], dtype=torch.float64)).tolist()
    return math.sqrt(error / max(total, 1e-30))


def least_squares_norm_weight(latents: list[torch.Tensor], eps: float, distributed=None) -> torch.Tensor:
    """Per-dimension ``gamma`` minimising ``sum_t (gamma * c_t / rms(c_t) - c_t)^2``: the weight
    that makes DeepSeek's ``kv_a_layernorm`` closest to the identity on calibration latents (with
    ``distributed``: every rank's, the sums all-reduced)."""
    numerator = denominator = 0.0
    for latent in latents:
        c = latent.reshape(-1, latent.shape[-1]).double()
        inverse_rms = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
        numerator = numerator + (c.pow(2) * inverse_rms).sum(0)
        denominator = denominator + (c.pow(2) * inverse_rms.pow(2)).sum(0)
    if distributed is not None:
        numerator, denominator = distributed.all_reduce_sum(torch.stack([numerator, denominator]))
    return (numerator / denominator.clamp_min(1e-30)).float()


# ----------------------------------------------------------------------------------------------
# The attention module


class MLAAttention(DeepseekV3Attention):
    """transformers' ``DeepseekV3Attention``, run inside a Llama-style block: it takes its rotary
    cos/sin from the block's ``position_embeddings`` at the frequencies the conversion kept (the
    same values DeepSeek's own rotary of size ``qk_rope_head_dim`` computes, when exportable).

    ``query_bias`` and ``latent_norm=False`` build the exact variants DeepSeek-V3 cannot store."""

    def __init__(
        self, config, layer_idx: int, rope_frequencies: torch.Tensor, query_bias: bool = False, latent_norm: bool = True
    ):
        super().__init__(config, layer_idx)
        self.register_buffer("rope_frequencies", rope_frequencies, persistent=False)
        if query_bias:
            self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.qk_head_dim, bias=True)
        if not latent_norm:
            self.kv_a_layernorm = nn.Identity()

    def forward(self, hidden_states, position_embeddings, *args, **kwargs):
        # Everything but the rotary table passes through untouched, by position or by name as it came:
        # transformers renames these arguments between releases (past_key_values -> cache in 5.24).
        cos, sin = position_embeddings
        index = torch.cat([self.rope_frequencies, self.rope_frequencies])
        return super().forward(hidden_states, (cos[..., index], sin[..., index]), *args, **kwargs)


TRANSMLA_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
)  # Llama blocks that DeepSeek-V3's layers can hold (not Qwen3's k_norm)


def check_convertible(config) -> None:
    """Refuse what TransMLA cannot convert exactly (before any work)."""
    model_type = getattr(config, "model_type", "?")
    if model_type == "qwen3":
        raise UnsupportedArchitecture(
            "transmla: qwen3 normalises each key head (k_norm), so its keys are not linear in the input and cannot "
            "share a latent; not convertible"
        )
    if any(t == "sliding_attention" for t in getattr(config, "layer_types", None) or []) or (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    ):
        raise UnsupportedArchitecture(
            f"transmla: {model_type} uses sliding-window attention, which DeepSeek-V3's latent attention has not"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture(
            f"transmla: rope {rope} is not plain RoPE; only the default rotary embedding converts to DeepSeek-V3's"
        )
    if getattr(config, "mlp_bias", False):
        raise UnsupportedArchitecture("transmla: the MLP has biases, which DeepSeek-V3's MLP has not")


def build_mla_attention(
    weights: MLAWeights, mla_config, layer_idx: int, o_proj: nn.Module, latent_norm_weight: torch.Tensor | None
) -> MLAAttention:
    """An ``MLAAttention`` holding ``weights`` (``latent_norm_weight=None``: no latent norm, exact)."""
    with torch.device("meta"):
        module = MLAAttention(
            mla_config, layer_idx, weights.rope_frequencies, weights.q_bias is not None, latent_norm_weight is not None
        )
    device = weights.q_weight.device
    module.rope_frequencies = weights.rope_frequencies.to(device)

    def put(linear, weight, bias=None):
        linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                (bias if bias is not None else weight.new_zeros(weight.shape[0])).contiguous(), requires_grad=False
            )

    put(module.q_proj, weights.q_weight, weights.q_bias)
    put(module.kv_a_proj_with_mqa, weights.kv_a_weight, weights.kv_a_bias)
    put(module.kv_b_proj, weights.kv_b_weight)
    if latent_norm_weight is not None:
        module.kv_a_layernorm.weight = nn.Parameter(latent_norm_weight.to(device), requires_grad=False)
    module.o_proj = o_proj
    if mla_config.attention_bias and o_proj.bias is None:  # DeepSeek-V3 builds o_proj with a bias then
        o_proj.bias = nn.Parameter(o_proj.weight.new_zeros(o_proj.out_features), requires_grad=False)
    return module.eval()


VLLM_MLA_SIZES = (
    576,
    320,
)  # kv_lora_rank + qk_rope_head_dim that vLLM's MLA backends accept (see compressor/serving.py)


def vllm_sizes(d: int, latent: int, rope_dim: int | None, where: str) -> tuple[int, int]:
    """(kv_lora_rank, rope_dim) whose sum vLLM's MLA accepts, the largest that fits this model:
    DeepSeek's 512 + 64 where head_dim allows a rotary key of 64, else ``rope_dim`` (or the largest
    even divisor of head_dim up to 64) with the latent filling the rest."""
    if rope_dim is None:
        rope_dim = max(r for r in range(2, min(d, 64) + 1, 2) if d % r == 0)
    for total in VLLM_MLA_SIZES:
        rank = total - rope_dim
        if 1 <= rank <= 2 * latent - rope_dim:
            return rank, rope_dim
    raise ValueError(
        f"{where}.serving: vllm needs kv_lora_rank + qk_rope_head_dim of {' or '.join(map(str, VLLM_MLA_SIZES))}, but "
        f"this model caches {2 * latent} numbers per token and layer (2 x num_key_value_heads x head_dim), so such a "
        "latent is no smaller than its cache; convert a larger model, or use serving: any for transformers"
    )


def mla_sizes(
    config,
    kv_lora_rank: int | None,
    kv_cache_ratio: float | None,
    rope_dim: int | None,
    freqfold: int | None,
    where: str = "transmla",
    exact: bool = False,
    serving: str = "any",
):
    """(kv_lora_rank, rope_dim, freqfold) for this model, checked; errors name the step key.
    ``exact``: every rotary dim of every kv head keeps RoPE (rope_dim = kv heads x head_dim, freqfold 1).
    ``serving: vllm``: sizes vLLM's MLA accepts (``vllm_sizes``), instead of ``kv_cache_ratio``."""
    geometry = attention_geometry(config)
    d, latent = geometry.head_dim, geometry.num_kv_heads * geometry.head_dim
    if serving == "vllm":
        if exact or kv_lora_rank is not None:
            raise ValueError(
                f"{where}.serving: vllm picks kv_lora_rank itself and serves the DeepSeek-V3 layout; leave "
                "kv_lora_rank unset and exact false"
            )
        kv_lora_rank, rope_dim = vllm_sizes(d, latent, rope_dim, where)
    if exact:
        if rope_dim not in (None, latent) or freqfold not in (None, 1):
            raise ValueError(
                f"{where}.exact: keeps every rotary key dim (qk_rope_head_dim {latent}, freqfold 1); leave "
                "qk_rope_head_dim and freqfold unset"
            )
        rank = kv_lora_rank if kv_lora_rank is not None else round(kv_cache_ratio * 2 * latent) - latent
        if not 1 <= rank <= latent:
            raise ValueError(
                f"{where}.kv_cache_ratio: exact keeps all {latent} rotary key dims, so the cache ratio must be above "
                f"0.5 (1.0 keeps the whole latent); kv_lora_rank {rank} is outside 1..{latent}"
            )
        return rank, latent, 1
    if (
        rope_dim is None
    ):  # the largest even divisor of head_dim within half the cache budget (head_dim with a given rank)
        budget = d if kv_lora_rank is not None else kv_cache_ratio * 2 * latent / 2
        rope_dim = max([r for r in range(2, d + 1, 2) if d % r == 0 and r <= budget] or [2])
    r = rope_dim
    if r < 2 or r % 2 or r > latent:
        raise ValueError(
            f"{where}.qk_rope_head_dim: {r} must be even and between 2 and num_key_value_heads * head_dim = {latent}"
        )
    if d % r:
        raise ValueError(
            f"{where}.qk_rope_head_dim: {r} does not divide head_dim {d}, so the rotary frequencies kept are not those "
            "of a DeepSeek-V3 rotary embedding"
        )
    ff = freqfold if freqfold is not None else min(2 * d // r, d // 2)
    if (d // 2) % ff or (r * ff) % d or r * ff // d > geometry.num_kv_heads * ff:
        raise ValueError(
            f"{where}.freqfold: {ff} does not fit head_dim {d} and qk_rope_head_dim {r}: it must divide head_dim/2 = "
            f"{d // 2} and make freqfold * qk_rope_head_dim / head_dim a whole number of rotary planes per group"
        )
    if kv_lora_rank is None:
        kv_lora_rank = round(kv_cache_ratio * 2 * latent) - r
    if not 1 <= kv_lora_rank <= 2 * latent - r:
        raise ValueError(
            f"{where}.kv_lora_rank: {kv_lora_rank} is outside 1..{2 * latent - r} (2 * num_key_value_heads * head_dim "
            f"- qk_rope_head_dim) for this model; a KV cache ratio must leave room for the {r} rotary dims"
        )
    return kv_lora_rank, r, ff


def kv_gram(block: nn.Module, attention: nn.Module, norm: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Float64 Gram of the ``[k | v]`` projection outputs (biases included) on the block's inputs."""
    gram = None
    for hidden in inputs:
        normed = norm(hidden)
        z = (
            torch.cat([attention.k_proj(normed), attention.v_proj(normed)], -1)
            .reshape(-1, attention.k_proj.out_features * 2)
            .double()
        )
        gram = z.T @ z if gram is None else gram + z.T @ z
    return gram


# ----------------------------------------------------------------------------------------------
# The step


@register_step("transmla")
@dataclass
class TransMLA(Step):
    """TransMLA: convert GQA attention into DeepSeek-V3 multi-head latent attention (smaller KV cache)."""

    changes_architecture = True
    families = TRANSMLA_FAMILIES
    distributes = "sums"  # the key/value Gram is a sum over tokens: reduced to the block's owner, which solves

    kv_cache_ratio: float = param(
        0.25, "KV cache per token after / before (latent + rotary key vs all keys and values)", min=0.0, max=1.0
    )
    kv_lora_rank: int | None = param(None, "latent size per token and layer; overrides kv_cache_ratio", min=1)
    qk_rope_head_dim: int | None = param(
        None,
        "dims of the shared rotary key (must divide head_dim); null: the largest that is at most half the cache budget",
        min=2,
    )
    freqfold: int | None = param(
        None,
        "neighbouring RoPE frequencies pooled in one RoRoPE PCA; null: 2 * head_dim / qk_rope_head_dim, at most "
        "head_dim / 2",
        min=1,
    )
    balance_kv: bool = param(True, "equalise key and value norms before their joint PCA")
    damp: float = param(0.01, "PCA damping, a fraction of the Gram's mean diagonal", min=0.0)
    exact: bool = param(
        False,
        "exact conversion: every rotary key dim keeps RoPE (longrope frequencies) and the latent norm works in its "
        "linear range; with kv_cache_ratio 1.0 the export equals the original; transformers only",
    )
    serving: str = param(
        "any",
        "vllm: pick kv_lora_rank + qk_rope_head_dim that vLLM's MLA accepts (576, else 320) instead of kv_cache_ratio",
        choices=("any", "vllm"),
    )

    def check_config(self, config) -> None:
        """Sizes and architecture, refused before the weights are read (the session names the recipe file and step)."""
        try:
            check_convertible(config)
            self.sizes(config)
        except (ValueError, UnsupportedArchitecture) as error:
            raise ValueError(str(error).removeprefix("transmla.").removeprefix("transmla: ")) from None

    def sizes(self, config) -> tuple[int, int, int]:
        """(kv_lora_rank, qk_rope_head_dim, freqfold) for ``config`` from this step's settings."""
        return mla_sizes(
            config,
            self.kv_lora_rank,
            self.kv_cache_ratio,
            self.qk_rope_head_dim,
            self.freqfold,
            exact=self.exact,
            serving=self.serving,
        )

    def compress_block(self, context: BlockContext) -> None:
        config = context.config
        check_convertible(config)
        geometry = attention_geometry(config)
        rank, rope_dim, freqfold = self.sizes(config)
        adapter = context.adapter
        attention_path = adapter.attention
        attention = context.block.get_submodule(attention_path)
        if attention.q_proj.bias is not None:
            raise UnsupportedArchitecture(
                f"transmla: {context.prefix}.{attention_path}.q_proj has a bias, which DeepSeek-V3's q_proj cannot "
                "hold (Qwen2, Llama with attention_bias); such models convert exactly in memory only"
            )
        norm = context.block.get_submodule(adapter.norms["input"])

        distributed = context.run.distributed
        with torch.no_grad():
            gram = kv_gram(context.block, attention, norm, context.inputs)
            # several processes: every rank's Gram meets at the block's owner, which solves (distributed.py)
            weights = distributed.solve_owned(
                {attention_path: [gram]},
                {attention_path: float(gram.shape[0] ** 3)},
                lambda _: transmla_weights(
                    attention.q_proj.weight,
                    attention.q_proj.bias,
                    attention.k_proj.weight,
                    attention.k_proj.bias,
                    attention.v_proj.weight,
                    attention.v_proj.bias,
                    gram,
                    num_heads=geometry.num_heads,
                    num_kv_heads=geometry.num_kv_heads,
                    head_dim=geometry.head_dim,
                    rope_dim=rope_dim,
                    freqfold=freqfold,
                    kv_lora_rank=rank,
                    balance_kv=self.balance_kv,
                    damp=self.damp,
                ),
                where=context.prefix,
                device=context.device,
            )[attention_path]
            mla_config = deepseek_v3_config(
                config,
                kv_lora_rank=rank,
                qk_rope_head_dim=rope_dim,
                qk_nope_head_dim=geometry.head_dim,
                v_head_dim=geometry.head_dim,
                rope_frequencies=weights.rope_frequencies,
            )
            context.declare_architecture(mla_config)  # the export is a DeepseekV3ForCausalLM
            gamma, norm_error = self.fit_latent_norm(weights, norm, context.inputs, rank, distributed)
            before = context.forward()
            module = build_mla_attention(
                weights, mla_config, getattr(attention, "layer_idx", context.index), attention.o_proj, gamma
            )
            context.replace_module(attention_path, module)
            after = context.forward()
        sums = torch.tensor(
            [
                sum((a - b).pow(2).sum().item() for a, b in zip(after, before)),
                sum(b.pow(2).sum().item() for b in before),
            ],
            dtype=torch.float64,
        )
        difference, total = distributed.all_reduce_sum(sums).tolist()  # over every rank's tokens
        error = difference / max(total, 1e-30)
        context.record(
            attention_path,
            kv_lora_rank=rank,
            qk_rope_head_dim=rope_dim,
            freqfold=freqfold,
            kv_per_token=rank + rope_dim,
            kv_per_token_before=2 * geometry.num_kv_heads * geometry.head_dim,
            rope_energy=round(weights.rope_energy, 5),
            kv_energy=round(weights.kv_energy, 5),
            latent_norm_error=float(f"{norm_error:.3g}"),
            block_output_error=math.sqrt(error),
        )

    def fit_latent_norm(
        self, weights, norm: nn.Module, inputs, rank: int, distributed=None
    ) -> tuple[torch.Tensor, float]:
        """``kv_a_layernorm``'s weight for the latents of ``inputs`` (every rank's, with ``distributed``) and its
        relative error. With ``exact``, the latent is first scaled into the norm's linear range (``kv_a`` rows
        scaled in place)."""
        latents = [nn.functional.linear(norm(h), weights.kv_a_weight, weights.kv_a_bias)[..., :rank] for h in inputs]
        eps = 1e-6  # DeepseekV3RMSNorm's default, which kv_a_layernorm keeps in transformers
        if self.exact:
            scale = linear_range_scale(latents, eps, distributed=distributed)
            weights.kv_a_weight[:rank] *= scale
            if weights.kv_a_bias is not None:
                weights.kv_a_bias[:rank] *= scale
            gamma = torch.full((rank,), math.sqrt(eps) / scale)
        else:
            scale, gamma = 1.0, least_squares_norm_weight(latents, eps=eps, distributed=distributed)
        return gamma, latent_norm_error(latents, gamma, eps, scale, distributed)


# ----------------------------------------------------------------------------------------------
# Healing: distillation towards the original model


@register_step("transmla_heal")
@dataclass
class TransMLAHeal(Step):
    """Healing after transmla: distil the converted model towards the original's next-token distributions."""

    kind = "model"
    distributes = "gradients"  # each rank the sequences of every step it holds, gradients summed (distill.py)
    commits_progress = True  # the trainer commits its state for --resume (distill.train_end_to_end)
    families = TRANSMLA_FAMILIES

    epochs: int = param(2, "passes over the calibration set", min=1)
    lr: float = param(3e-4, "AdamW learning rate", min=0.0)
    batch_size: int = param(4, "sequences per optimizer step", min=1)
    top_k: int = param(64, "teacher log-probabilities kept per token (the rest of the vocabulary is one bucket)", min=1)
    train: str = param(
        "attention", "what learns: the converted attention layers, or every block weight", choices=("attention", "all")
    )
    heldout: float = param(
        0.1,
        "fraction of the calibration sequences held out: their KL is measured before training and after each epoch, "
        "and the best state is kept (0: train on all, keep the last)",
        min=0.0,
        max=0.5,
    )

    def check_config(self, config) -> None:
        check_top_k(self.top_k, config)

    def compress_model(self, context: ModelContext) -> None:
        blocks = context.blocks
        attentions = [m for block in blocks for m in block.modules() if isinstance(m, MLAAttention)]
        if not attentions:
            raise ValueError("transmla_heal: the model has no converted attention; put a transmla step before it")
        owners = attentions if self.train == "attention" else list(blocks)
        parameters = [p for owner in owners for p in owner.parameters() if p.is_floating_point()]
        for p in parameters:
            p.requires_grad_(True)
        try:  # each epoch in its own seeded order; one step per batch, no micro-batches
            losses, best = train_end_to_end(
                context,
                [{"params": parameters, "lr": self.lr}],
                name=self.name,
                epochs=self.epochs,
                batch_size=self.batch_size,
                micro_batch_size=self.batch_size,
                top_k=self.top_k,
                heldout=self.heldout,
                order=lambda epoch, count: torch.randperm(count, generator=torch.Generator().manual_seed(epoch)),
            )
        finally:
            for p in parameters:
                p.requires_grad_(False)
                p.grad = None
        steps_per_epoch = len(losses) // self.epochs
        context.record(
            "model",
            first_epoch_kl=sum(losses[:steps_per_epoch]) / steps_per_epoch,
            last_epoch_kl=sum(losses[-steps_per_epoch:]) / steps_per_epoch,
            steps=len(losses),
            trained_parameters=sum(p.numel() for p in parameters),
            **(best.summary() if best else {}),
        )
