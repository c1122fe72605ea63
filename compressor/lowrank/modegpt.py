"""MoDeGPT (Lin et al., "Modular Decomposition for Large Language Model Compression", arXiv 2408.09632):
the solvers, as plain functions on tensors, and the ``modegpt`` layer step.

MoDeGPT compresses the pairs of matrices multiplied inside a block, choosing their shared inner
dimension to keep each module's output on calibration activations: Type I, the MLP (keep neurons by
ridge leverage scores of ``C_sigma``, refit ``down`` in closed form: Nystrom); Type II, query-key (keep
whole rotary pairs per KV head by the CR score, shared by a GQA group); Type III, value-output (per KV
head, the truncated SVD of ``C_x^{1/2} W_V [W_O,h1 .. W_O,hg]``); the keep ratio of each block from a
global allocation over block importances (1 - cosine of a block's input and output), capped. The step
scores every block of the original model first (``context.original_block``), allocates, then compresses
each block on the inputs of the already-compressed blocks before it. Exports ``sliced`` (per-layer
widths, ``arch/modegpt/modeling_modegpt.py`` shipped) or ``masked`` (zero-padded stock shapes).

Mixture-of-experts models (Mixtral, Qwen2/3-MoE, DeepSeek-V3): Type I on every gated MLP of a block, each
routed expert on exactly its routed tokens (``moe.RoutedExperts``), shared experts and dense MLPs alike;
attention left whole; ``masked`` only (a MoE config has one expert width); an expert no calibration token
reached is left whole and named in a warning. A natural extension, not in the paper.

Defaults: ``modules: [vo, mlp]``, i.e. query-key compression off, a deviation from the paper (it
measured worse than plain truncated SVD on the demo; ``[qk, vo, mlp]`` is the paper). Other choices:
ridge ``1e-2 * mean diag`` (scale-free); the refit ``W_S + W_R C[R,S] C[S,S]^-1`` (exact at full keep);
smoothing ``eps = 0.15`` and cap ``0.8`` (cbacary/MoDeGPT's); the inverse-free Type III form (no
ridge); softmax scale of the original head dim. Reasons and measured numbers: docs/methods/modegpt.md.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.arch import adapter_for, attention_geometry
from compressor.arch.modegpt import modeling_modegpt, sliced_config
from compressor.blockwise import run_block
from compressor.moe import Expert
from compressor.step import Step, param, register_step

if TYPE_CHECKING:
    from compressor.context import BlockContext


# ----------------------------------------------------------------------------------------------
# Global sparsity allocation


def block_importance(block_inputs: list[torch.Tensor], block_outputs: list[torch.Tensor], distributed=None) -> float:
    """1 - the mean cosine similarity of each token's residual stream before and after the block
    (over batches, without concatenating them; with ``distributed``, over every rank's tokens)."""
    total, count = 0.0, 0
    for x, y in zip(block_inputs, block_outputs, strict=True):
        total += float(
            torch.nn.functional.cosine_similarity(x.flatten(0, -2).double(), y.flatten(0, -2).double(), dim=-1).sum()
        )
        count += x[..., 0].numel()
    if distributed is not None:
        total, count = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return 1 - total / count


def allocate_sparsity(
    importance: torch.Tensor, target: float, smoothing: float = 0.15, cap: float = 0.8
) -> torch.Tensor:
    """Per-block sparsity with mean ``target``: ``L * target * softmax(-importance / smoothing)``, each
    at most ``cap``; the excess of capped blocks goes to the others in proportion to their weights."""
    count = len(importance)
    if not 0 <= target <= cap:
        raise ValueError(f"ratio: a mean sparsity of {target} cannot be spread with each block at most {cap}")
    weights = torch.softmax(-importance.double() / smoothing, dim=0)
    sparsity = count * target * weights
    capped = torch.zeros(count, dtype=torch.bool)
    while (over := (sparsity > cap + 1e-12) & ~capped).any():
        capped |= over
        free = ~capped
        sparsity[capped] = cap
        sparsity[free] = (count * target - cap * int(capped.sum())) * weights[free] / weights[free].sum()
    return sparsity


# ----------------------------------------------------------------------------------------------
# Type I: MLP by Nystrom approximation


def ridge_leverage_scores(correlation: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """``diag(C (C + lambda I)^-1)`` with ``lambda = ridge * mean diag(C)``, in float64."""
    c = correlation.double()
    lam = ridge * c.diagonal().mean()
    eye = torch.eye(len(c), dtype=c.dtype, device=c.device)
    return 1 - lam * torch.cholesky_inverse(torch.linalg.cholesky(c + lam * eye)).diagonal()


def refit_down(down: torch.Tensor, correlation: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The least-squares ``down`` [D, k] for the kept neurons ``index``: ``W_down C[:, S] (C[S, S])^-1``,
    written ``W_S + W_R C[R, S] C[S, S]^-1`` (R the dropped neurons): the same where ``C[S, S]`` is
    invertible, and where calibration leaves it singular the kept columns keep their own weights along
    the unseen directions, so keeping every neuron returns ``W_down`` exactly."""
    c, w = correlation.double(), down.double()
    dropped = torch.ones(len(c), dtype=torch.bool, device=c.device)
    dropped[index] = False
    kept = c[index][:, index]
    jitter = 1e-10 * kept.diagonal().mean() * torch.eye(len(index), dtype=c.dtype, device=c.device)
    transfer = torch.linalg.solve(kept + jitter, c[index][:, dropped])  # [k, F - k]: C[S, S]^-1 C[S, R]
    return w[:, index] + w[:, dropped] @ transfer.T


def nystrom_mlp(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, correlation: torch.Tensor, keep: int, ridge: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Type I. ``gate``, ``up`` [F, D], ``down`` [D, F] (``nn.Linear`` weights), ``correlation`` the
    ``[F, F]`` sum of ``z z^T`` over calibration tokens, ``z = silu(gate x) * up x``. Returns the kept
    rows of gate and up, the refitted down [D, keep] and the kept neuron indices (ascending)."""
    index = ridge_leverage_scores(correlation, ridge).topk(keep).indices.sort().values
    return gate[index], up[index], refit_down(down, correlation, index).to(down.dtype), index


# ----------------------------------------------------------------------------------------------
# Type II: key-query by CR decomposition, whole rotary pairs, shared within a GQA group


def rotary_pair_scores(query_diag: torch.Tensor, key_diag: torch.Tensor) -> torch.Tensor:
    """CR scores ``[n_kv, d/2]`` of the rotary pairs ``(p, p + d/2)`` from the diagonals of the query
    (``[n_heads, d]``) and key (``[n_kv, d]``) activation correlations, pre-RoPE."""
    n_heads, d = query_diag.shape
    n_kv = len(key_diag)
    per_coordinate = (query_diag.double().view(n_kv, n_heads // n_kv, d) * key_diag.double()[:, None, :]).sum(1)
    return (per_coordinate[:, : d // 2] + per_coordinate[:, d // 2 :]).clamp(min=0).sqrt()


def kept_coordinates(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[n_kv, 2p]`` coordinates of kept pairs in the half-split layout: the pairs, then their partners."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


def cr_key_query(
    query: torch.Tensor,
    key: torch.Tensor,
    query_diag: torch.Tensor,
    key_diag: torch.Tensor,
    keep_pairs: int,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
):
    """Type II. ``query`` [n_heads * d, D] and ``key`` [n_kv * d, D] weights. Returns the new query and
    key weights ``[heads * 2 * keep_pairs, D]`` (and biases), and the kept pair indices ``[n_kv,
    keep_pairs]`` (ascending): the rotary frequencies each kept pair must keep using."""
    pairs = rotary_pair_scores(query_diag, key_diag).topk(keep_pairs, dim=1).indices.sort(dim=1).values
    return key_query_keeping(query, key, pairs, query_diag.shape[0], query_bias, key_bias)


def key_query_keeping(
    query: torch.Tensor,
    key: torch.Tensor,
    pairs: torch.Tensor,
    n_heads: int,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
):
    """The query and key weights (and biases) keeping the rotary ``pairs`` ``[n_kv, p]`` of each KV head,
    for every query head of its group; returns them with ``pairs``, as ``cr_key_query`` does."""
    n_kv = pairs.shape[0]
    d = key.shape[0] // n_kv
    coords = kept_coordinates(pairs, d)  # [n_kv, 2p]
    group = n_heads // n_kv

    def take(weight: torch.Tensor, heads_per_kv: int) -> torch.Tensor:
        shaped = weight.reshape(n_kv, heads_per_kv, d, *weight.shape[1:])
        index = coords[:, None, :].expand(n_kv, heads_per_kv, coords.shape[1])
        if weight.dim() == 2:
            index = index[..., None].expand(*index.shape, weight.shape[1])
        return shaped.gather(2, index).reshape(-1, *weight.shape[1:])

    new_query, new_key = take(query, group), take(key, 1)
    new_query_bias = take(query_bias, group) if query_bias is not None else None
    new_key_bias = take(key_bias, 1) if key_bias is not None else None
    return new_query, new_key, new_query_bias, new_key_bias, pairs


# ----------------------------------------------------------------------------------------------
# Type III: value-output by whitened SVD, joint over a GQA group's output heads


def correlation_root(correlation: torch.Tensor) -> torch.Tensor:
    """``C^{1/2}`` of a symmetric positive semi-definite correlation, in float64."""
    values, vectors = torch.linalg.eigh(correlation.double())
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def whitened_value_output(
    value: torch.Tensor,
    output: torch.Tensor,
    correlation: torch.Tensor,
    n_heads: int,
    n_kv: int,
    keep: int,
    value_bias: torch.Tensor | None = None,
):
    """Type III. ``value`` [n_kv * d, D], ``output`` [D, n_heads * d] (``nn.Linear`` weights),
    ``correlation`` ``C_x`` [D, D] of the attention's (normalised) inputs. Per KV head j with query
    heads h of its group: the top-``keep`` left singular vectors ``U_k`` of ``C^{1/2} W_V,j [W_O,h ..]``,
    then ``W_V,j <- W_V,j B`` with ``B = (C^{1/2} W_V,j)^+ U_k`` and ``W_O,h <- U_k^T C^{1/2} W_V,j W_O,h``.
    Returns the new value weight [n_kv * keep, D], output weight [D, n_heads * keep] and value bias."""
    d = value.shape[0] // n_kv
    group = n_heads // n_kv
    if keep >= d:  # nothing to drop: exact, whatever the calibration data spans
        return value, output, value_bias
    root = correlation_root(correlation)
    new_values, new_outputs, new_biases = [], [], []
    for j in range(n_kv):
        value_j = value[j * d : (j + 1) * d].double().T  # [D, d]: x @ value_j is head j's value
        whitened = root @ value_j  # [D, d]
        outputs = [output[:, h * d : (h + 1) * d].double().T for h in range(j * group, (j + 1) * group)]  # each [d, D]
        left, _, _ = torch.linalg.svd(whitened @ torch.cat(outputs, dim=1), full_matrices=False)
        basis = left[:, :keep]  # [D, k]
        projection = torch.linalg.pinv(whitened) @ basis  # [d, k]
        new_values.append((value_j @ projection).T)  # [k, D]
        new_outputs += [(basis.T @ whitened @ out).T for out in outputs]  # each [D, k]
        if value_bias is not None:
            new_biases.append(projection.T @ value_bias[j * d : (j + 1) * d].double())
    new_bias = torch.cat(new_biases).to(value_bias.dtype) if value_bias is not None else None
    return torch.cat(new_values).to(value.dtype), torch.cat(new_outputs, dim=1).to(output.dtype), new_bias


# ----------------------------------------------------------------------------------------------
# Sizes: from a block's keep ratio to its widths


def round_to_multiple(value: float, multiple: int, low: int, high: int) -> int:
    """``value`` rounded to a multiple of ``multiple`` within ``[low, high]`` (``high`` is always allowed)."""
    rounded = int(round(value / multiple)) * multiple
    return high if rounded >= high else max(rounded, low)


@dataclass(frozen=True)
class BlockSizes:
    """One compressed block's widths (the original's when a module is left whole)."""

    intermediate_size: int
    qk_pairs: int  # rotary pairs kept per KV head: the q/k head dim is twice this
    v_head_dim: int

    def parameters(self, hidden: int, heads: int, kv_heads: int) -> int:
        """Weights of the block's seven projections (biases aside)."""
        qk = 2 * self.qk_pairs
        return hidden * (
            (heads + kv_heads) * qk + kv_heads * self.v_head_dim + heads * self.v_head_dim + 3 * self.intermediate_size
        )


def block_sizes(
    keep: float, modules: list[str], intermediate: int, head_dim: int, heads: int, round_to: int
) -> BlockSizes:
    """The widths of a block keeping ``keep`` of each compressed module: MLP neurons rounded to
    ``round_to``, value head dims so that ``o_proj``'s input (heads x v_head_dim) is a multiple of it,
    q/k head dims to whole rotary pairs."""
    v_step = round_to // math.gcd(round_to, heads)
    return BlockSizes(
        intermediate_size=round_to_multiple(keep * intermediate, round_to, round_to, intermediate)
        if "mlp" in modules
        else intermediate,
        qk_pairs=max(1, min(head_dim // 2, round(keep * head_dim / 2))) if "qk" in modules else head_dim // 2,
        v_head_dim=round_to_multiple(keep * head_dim, v_step, v_step, head_dim) if "vo" in modules else head_dim,
    )


# ----------------------------------------------------------------------------------------------
# Statistics of one block on its calibration inputs (hooks, float64)


@torch.no_grad()
def attention_statistics(context: BlockContext, attention: nn.Module, heads: int, kv_heads: int, head_dim: int):
    """``C_x`` (the attention's normalised inputs), the per-coordinate energy of the queries and keys
    before RoPE (``[heads, d]``, ``[kv_heads, d]``), and the block's outputs."""
    stats = {}

    def on_query(module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        stats["x"] = stats.get("x", 0) + x.T @ x
        stats["q"] = stats.get("q", 0) + output.reshape(-1, heads, head_dim).double().pow(2).sum(0)

    def on_key(module, args, output):
        stats["k"] = stats.get("k", 0) + output.reshape(-1, kv_heads, head_dim).double().pow(2).sum(0)

    hooks = [attention.q_proj.register_forward_hook(on_query), attention.k_proj.register_forward_hook(on_key)]
    try:
        outputs = context.forward()
    finally:
        for hook in hooks:
            hook.remove()
    return stats["x"], stats["q"], stats["k"], outputs


@contextmanager
def down_correlations(downs: dict):
    """While the body runs the model, ``stats[name]`` (yielded) adds ``z z^T`` over the inputs ``z`` of each
    ``down`` linear of ``downs`` (name -> linear), in float64: ``C_sigma`` of each gated MLP, or of each
    expert over exactly the tokens routed to it (``moe.RoutedExperts`` calls an expert on its own tokens).
    A linear no token reached has no entry."""
    stats = {}

    def hook(name):
        def on_down(module, args):
            z = args[0].reshape(-1, args[0].shape[-1]).double()
            stats[name] = stats.get(name, 0) + z.T @ z

        return on_down

    hooks = [down.register_forward_pre_hook(hook(name)) for name, down in downs.items()]
    try:
        yield stats
    finally:
        for handle in hooks:
            handle.remove()


@torch.no_grad()
def mlp_correlation(context: BlockContext, mlp: nn.Module) -> torch.Tensor:
    """``C_sigma = sum z z^T`` of the MLP's intermediate activations (``down_proj``'s inputs)."""
    with down_correlations({"z": mlp.down_proj}) as stats:
        context.forward()
    return stats["z"]


# ----------------------------------------------------------------------------------------------
# Writing the solutions into modules: sliced (new widths) or masked (zero-padded, stock shapes)


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.to(linear.weight.device, linear.weight.dtype).contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.weight.device, linear.weight.dtype).contiguous(), requires_grad=False)


def padded_rows(rows: torch.Tensor, positions: torch.Tensor, total: int) -> torch.Tensor:
    """``rows`` placed at ``positions`` of a zero tensor with ``total`` rows."""
    out = rows.new_zeros(total, *rows.shape[1:])
    out[positions] = rows
    return out


def head_positions(coordinates: torch.Tensor, heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """Row positions in a ``[heads * head_dim]`` projection of per-KV-head coordinates ``[n_kv, c]``,
    each KV head's coordinates repeated for its ``heads_per_kv`` heads."""
    kv_heads = coordinates.shape[0]
    heads = torch.arange(kv_heads * heads_per_kv, device=coordinates.device)
    return (heads[:, None] * head_dim + coordinates.repeat_interleave(heads_per_kv, 0)).reshape(-1)


def write_attention(attention: nn.Module, sizes: BlockSizes, qk, vo, geometry, sliced: bool) -> nn.Module:
    """The attention holding the Type II (``qk``: query, key, their biases, kept pairs) and Type III
    (``vo``: value, output, value bias) solutions: a new ``SlicedAttention``, or the stock module
    zero-padded in place (``sliced=False``)."""
    heads, kv_heads, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    query, key, query_bias, key_bias, pairs = qk
    value, output, value_bias = vo
    if sliced:
        module = modeling_modegpt.SlicedAttention(attention, 2 * sizes.qk_pairs, sizes.v_head_dim, pairs.tolist())
        set_linear(module.q_proj, query, query_bias)
        set_linear(module.k_proj, key, key_bias)
        set_linear(module.v_proj, value, value_bias)
        set_linear(module.o_proj, output, attention.o_proj.bias)
        return module
    coordinates = kept_coordinates(pairs, d)
    q_rows, k_rows = head_positions(coordinates, heads // kv_heads, d), head_positions(coordinates, 1, d)
    value_slots = torch.arange(sizes.v_head_dim).expand(kv_heads, -1)
    v_rows, o_columns = head_positions(value_slots, 1, d), head_positions(value_slots, heads // kv_heads, d)
    set_linear(
        attention.q_proj,
        padded_rows(query, q_rows, heads * d),
        None if query_bias is None else padded_rows(query_bias, q_rows, heads * d),
    )
    set_linear(
        attention.k_proj,
        padded_rows(key, k_rows, kv_heads * d),
        None if key_bias is None else padded_rows(key_bias, k_rows, kv_heads * d),
    )
    set_linear(
        attention.v_proj,
        padded_rows(value, v_rows, kv_heads * d),
        None if value_bias is None else padded_rows(value_bias, v_rows, kv_heads * d),
    )
    set_linear(attention.o_proj, padded_rows(output.T, o_columns, heads * d).T, attention.o_proj.bias)
    return attention


def write_mlp(mlp: nn.Module, gate, up, down, index: torch.Tensor, sliced: bool) -> None:
    """The Type I solution into the MLP: narrower projections, or zero rows/columns at dropped neurons."""
    if sliced:
        biases = [linear.bias for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        modeling_modegpt.slice_mlp(mlp, len(index))  # new, uninitialised projections: every tensor is set below
        set_linear(mlp.gate_proj, gate, None if biases[0] is None else biases[0][index])
        set_linear(mlp.up_proj, up, None if biases[1] is None else biases[1][index])
        set_linear(mlp.down_proj, down, biases[2])
        return
    mask_neurons((mlp.gate_proj, mlp.up_proj, mlp.down_proj), gate, up, down, index)


def mask_neurons(linears, gate, up, down, index: torch.Tensor) -> None:
    """The Type I solution into a gated MLP's ``(gate, up, down)`` linears at their own shapes: the kept neurons'
    rows (and refitted ``down`` columns) at ``index``, zeros at the dropped neurons."""
    gate_linear, up_linear, down_linear = linears
    width = gate_linear.out_features
    set_linear(gate_linear, padded_rows(gate, index, width), gate_linear.bias)
    set_linear(up_linear, padded_rows(up, index, width), up_linear.bias)
    set_linear(down_linear, padded_rows(down.T, index, width).T, down_linear.bias)


# ----------------------------------------------------------------------------------------------
# Mixture-of-experts blocks: Type I on every gated MLP of the block

GATED = ("gate_proj", "up_proj", "down_proj")


def mlp_units(adapter, block: nn.Module) -> dict[str, tuple[str, tuple[nn.Module, nn.Module, nn.Module]]]:
    """The gated MLPs of a block of a MoE model, path in the block -> (kind, its gate, up and down linears):
    each routed expert (``expert``: ``mlp.experts.{e}``, under the checkpoint's projection names), each shared
    expert (``shared``: Qwen2-MoE's ``mlp.shared_expert``, DeepSeek's ``mlp.shared_experts``) or the block's
    dense MLP (``dense``: DeepSeek's first layers, Qwen-MoE's ``mlp_only_layers``)."""
    units = {}
    for name, module in block.get_submodule(adapter.mlp).named_modules():
        path = f"{adapter.mlp}.{name}" if name else adapter.mlp
        if isinstance(module, Expert):
            units[path] = ("expert", module.projections())
        elif all(isinstance(getattr(module, n, None), nn.Module) for n in GATED):
            units[path] = ("shared" if name else "dense", tuple(getattr(module, n) for n in GATED))
    return units


def block_survey(adapter, block: nn.Module) -> dict:
    """What the plan of a MoE model counts in one (original) block: its projection weights (every
    ``nn.Linear``), and the kind and width of each gated MLP."""
    return {
        "weights": sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)),
        "units": {path: (kind, linears[0].out_features) for path, (kind, linears) in mlp_units(adapter, block).items()},
    }


# ----------------------------------------------------------------------------------------------
# The recipe step

MODULE_TYPES = ("qk", "vo", "mlp")


@register_step("modegpt")
@dataclass
class ModeGPT(Step):
    """MoDeGPT: training-free compression by module (Nystrom MLP, CR query-key, whitened-SVD value-output)."""

    changes_architecture = True
    # the Llama block (its sliced export has their rows); MoE families: the MLPs only, masked (compress_experts_block)
    families = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
    # correlations and energies are sums over tokens: reduced to each decomposition's owner, which solves
    distributes = "sums"

    ratio: float = param(
        0.25,
        "fraction of the blocks' projection weights removed, spread over the blocks by importance",
        min=0.0,
        max=0.9,
    )
    modules: list[str] = param(
        ["vo", "mlp"],
        "modules compressed: qk (query/key head dims, whole rotary pairs), vo (value head dims), mlp (neurons); qk is "
        "off by default: measured worse than plain SVD on the demo (docs/methods/modegpt.md)",
    )
    export: str = param(
        "sliced",
        "sliced: smaller weights, per-layer sizes in the config, modeling code shipped (trust_remote_code); masked: "
        "zero-padded to the original shapes, loads in stock transformers and vLLM, no savings",
        choices=("sliced", "masked"),
    )
    smoothing: float = param(
        0.15,
        "allocation temperature: sparsity = L * ratio * softmax(-importance / smoothing); large = uniform",
        min=1e-6,
    )
    max_sparsity: float = param(
        0.8, "no block loses more than this fraction of its compressed modules", min=0.0, max=0.95
    )
    ridge: float = param(1e-2, "ridge of the MLP's leverage scores, relative to the mean neuron energy", min=0.0)
    round_to: int = param(
        1,
        "MLP widths, and o_proj's input width (heads x value head dim), rounded to a multiple of this (a following "
        "quantizer's group size)",
        min=1,
    )
    skip_layers: list[int] = param([], "blocks left whole (their share goes to the others)")

    def check_config(self, config) -> None:
        experts = adapter_for(config).experts
        if experts is not None:
            if self.export == "sliced":
                raise ValueError(
                    "sliced: a mixture-of-experts config holds one expert width for every layer and expert "
                    f"({experts.intermediate_size}), so per-expert widths cannot load in stock transformers; use "
                    "export: masked"
                )
            if "mlp" not in self.modules:
                raise ValueError(f"modules: {self.modules} leaves nothing of a mixture-of-experts model (add mlp)")
            width = getattr(config, experts.intermediate_size)
            if self.round_to > width:
                raise ValueError(f"round_to: {self.round_to} does not fit this model (expert width {width})")
            return
        geometry = attention_geometry(config)
        v_step = self.round_to // math.gcd(self.round_to, geometry.num_heads)
        if self.round_to > config.intermediate_size or v_step > geometry.head_dim:
            raise ValueError(
                f"round_to: {self.round_to} does not fit this model (MLP width {config.intermediate_size}, "
                f"{geometry.num_heads} heads of {geometry.head_dim} value dims)"
            )

    def check(self) -> None:
        unknown = [m for m in self.modules if m not in MODULE_TYPES]
        if unknown or not self.modules or len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules: {self.modules} must be distinct names among {', '.join(MODULE_TYPES)}")
        if self.ratio > self.max_sparsity:
            raise ValueError(f"ratio: {self.ratio} is above max_sparsity {self.max_sparsity}")

    # --- the plan: block importances and each block's keep ratio (once, before block 0) ---------

    def plan(self, context: BlockContext) -> dict:
        config, geometry = context.config, attention_geometry(context.config)
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"modegpt: partial rotary embeddings ({rope}) are not supported")
        bad = [i for i in self.skip_layers if not 0 <= i < context.num_blocks]
        if bad:
            raise ValueError(f"skip_layers: {bad} are not blocks of this model (0..{context.num_blocks - 1})")
        modules = list(self.modules)
        notes = []
        if context.adapter.qk_norms and "qk" in modules:  # per-head q/k RMSNorms need every coordinate
            modules.remove("qk")
            notes.append("qk left whole: the model normalises each query/key head (q_norm, k_norm) over all its dims")
        hidden, heads, kv_heads, d = config.hidden_size, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
        full = BlockSizes(config.intermediate_size, d // 2, d)
        whole = full.parameters(hidden, heads, kv_heads)
        compressible = whole - block_sizes(0.0, modules, config.intermediate_size, d, heads, 1).parameters(
            hidden, heads, kv_heads
        )
        active = [i for i in range(context.num_blocks) if i not in self.skip_layers]
        target = self.ratio * whole * context.num_blocks / (compressible * max(len(active), 1)) if modules else 0.0
        if self.ratio > 0 and (not modules or not active or target > self.max_sparsity):
            raise ValueError(
                f"ratio: {self.ratio} of the blocks' weights cannot be removed from modules {modules} of {len(active)} "
                f"blocks with at most {self.max_sparsity} of each removed"
            )
        importance = self.block_importances(context)
        sparsity = torch.zeros(context.num_blocks, dtype=torch.float64)
        if active and target > 0:
            sparsity[active] = allocate_sparsity(importance[active], target, self.smoothing, self.max_sparsity)
        sizes = [
            block_sizes(1 - float(s), modules if i in active else [], config.intermediate_size, d, heads, self.round_to)
            for i, s in enumerate(sparsity)
        ]
        return {
            "modules": modules,
            "importance": importance,
            "sparsity": sparsity,
            "sizes": sizes,
            "notes": notes,
            "parameters": (whole * context.num_blocks, sum(s.parameters(hidden, heads, kv_heads) for s in sizes)),
        }

    def block_importances(self, context: BlockContext, survey: list | None = None) -> torch.Tensor:
        """1 - cos(input, output) of every block of the original model on the calibration inputs (and, into
        ``survey``, each original block's ``block_survey``)."""
        hidden, scores = context.inputs, []
        with context.progress(context.num_blocks, "block importance (original model)", "block") as progress:
            for index in range(context.num_blocks):
                block = context.original_block(index)
                outputs = run_block(block, hidden, context.block_kwargs)
                scores.append(block_importance(hidden, outputs, context.run.distributed))
                if survey is not None:
                    survey.append(block_survey(context.adapter, block))
                hidden = outputs
                del block
                progress.update(1)
        return torch.tensor(scores, dtype=torch.float64)

    # --- one block ------------------------------------------------------------------------------

    def compress_block(self, context: BlockContext) -> None:
        if context.adapter.experts is not None:
            return self.compress_experts_block(context)
        if "plan" not in context.state:
            context.state["plan"] = self.plan(context)
            geometry = attention_geometry(context.config)
            whole = BlockSizes(context.config.intermediate_size, geometry.head_dim // 2, geometry.head_dim)
            every_pair = [list(range(geometry.head_dim // 2))] * geometry.num_kv_heads
            context.state["layers"] = [self.layer_spec(whole, every_pair) for _ in range(context.num_blocks)]
        plan = context.state["plan"]
        sizes, modules = plan["sizes"][context.index], plan["modules"]
        geometry, adapter = attention_geometry(context.config), context.adapter
        attention = context.block.get_submodule(adapter.attention)
        mlp = context.block.get_submodule(adapter.mlp)
        dense = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")
        ]
        if not all(type(linear) is nn.Linear for linear in dense):
            raise ValueError(
                f"modegpt: block {context.index} is not a dense Llama-family block (put modegpt before quantizers and "
                "attention rewrites)"
            )
        sliced = self.export == "sliced"
        if context.index not in self.skip_layers:
            with torch.no_grad():
                before, pairs = self.compress_attention(context, attention, sizes, modules, geometry, sliced)
                if "mlp" in modules:
                    correlation = mlp_correlation(context, mlp)
                    gate, up, down, index = context.run.distributed.solve_owned(
                        {adapter.mlp: [correlation]},
                        {adapter.mlp: float(correlation.shape[0] ** 3)},
                        lambda _: nystrom_mlp(
                            mlp.gate_proj.weight,
                            mlp.up_proj.weight,
                            mlp.down_proj.weight,
                            correlation,
                            sizes.intermediate_size,
                            self.ridge,
                        ),
                        where=context.prefix,
                        device=context.device,
                    )[adapter.mlp]
                    write_mlp(mlp, gate, up, down, index, sliced)
                after = context.forward()
            sums = torch.tensor(
                [
                    float(sum((a - b).double().pow(2).sum() for a, b in zip(after, before))),
                    float(sum(b.double().pow(2).sum() for b in before)),
                ],
                dtype=torch.float64,
            )
            difference, total = context.run.distributed.all_reduce_sum(sums).tolist()  # over every rank's tokens
            error = difference / total
            hidden, heads, kv_heads = context.config.hidden_size, geometry.num_heads, geometry.num_kv_heads
            context.record(
                "block",
                importance=float(plan["importance"][context.index]),
                sparsity=round(float(plan["sparsity"][context.index]), 5),
                intermediate_size=sizes.intermediate_size,
                qk_head_dim=2 * sizes.qk_pairs,
                v_head_dim=sizes.v_head_dim,
                parameters=sizes.parameters(hidden, heads, kv_heads),
                block_output_error=math.sqrt(float(error)),
            )
            if pairs is not None:
                context.state["layers"][context.index] = self.layer_spec(sizes, pairs.tolist())
        if sliced:
            context.declare_architecture(sliced_config(context.config, context.state["layers"]))
        if context.index == context.num_blocks - 1:
            self.record_totals(context, plan)

    def record_totals(self, context: BlockContext, plan: dict, **counts) -> None:
        before_count, after_count = plan["parameters"]
        context.record(
            "blocks",
            removed=round(1 - after_count / before_count, 5),
            target=self.ratio,
            parameters=after_count,
            parameters_before=before_count,
            **counts,
            **({"note": "; ".join(plan["notes"])} if plan["notes"] else {}),
        )

    def compress_attention(
        self, context: BlockContext, attention, sizes: BlockSizes, modules: list[str], geometry, sliced: bool
    ):
        """Type II and III on the block's attention; returns the block's outputs before, and the kept pairs."""
        heads, kv_heads, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
        correlation, query_energy, key_energy, before = attention_statistics(context, attention, heads, kv_heads, d)
        if "qk" not in modules and "vo" not in modules and not sliced:
            return before, None
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        hidden = correlation.shape[0]

        def solve(name: str):
            if name == "qk":
                return cr_key_query(q.weight, k.weight, query_energy, key_energy, sizes.qk_pairs, q.bias, k.bias)
            return whitened_value_output(v.weight, o.weight, correlation, heads, kv_heads, sizes.v_head_dim, v.bias)

        # several processes: the sums of every rank meet at each decomposition's owner (compressor/distributed.py)
        statistics = {"qk": [query_energy, key_energy], **({"vo": [correlation]} if "vo" in modules else {})}
        costs = {"qk": float(heads * d), "vo": float(hidden**3 + kv_heads * hidden * (heads // kv_heads * d) ** 2)}
        solved = context.run.distributed.solve_owned(
            statistics, costs, solve, where=f"{context.prefix}.{context.adapter.attention}", device=context.device
        )
        qk, vo = solved["qk"], solved.get("vo", (v.weight, o.weight, v.bias))
        module = write_attention(attention, sizes, qk, vo, geometry, sliced)
        if module is not attention:
            context.replace_module(context.adapter.attention, module)
        return before, qk[4]

    @staticmethod
    def layer_spec(sizes: BlockSizes, pairs: list[list[int]]) -> dict:
        """A layer's entry in the sliced config (``arch/modegpt``)."""
        return {
            "intermediate_size": sizes.intermediate_size,
            "qk_head_dim": 2 * len(pairs[0]),
            "v_head_dim": sizes.v_head_dim,
            "rope_pairs": pairs,
        }

    # --- mixture-of-experts models: Type I on each expert, shared expert and dense MLP; masked ------------

    def plan_experts(self, context: BlockContext) -> dict:
        """The plan of a MoE model, counted from its original blocks (``block_survey``): every block's
        projection weights, its gated MLPs (routed experts, shared experts, or a dense MLP) and their
        widths. The allocation spreads the sparsity over the blocks as for dense ones; within a block, every
        gated MLP keeps the same share of its neurons. Attention is left whole (MLA has no q/k/v heads, and
        one method for every family is the simpler truth), said in the report's note."""
        bad = [i for i in self.skip_layers if not 0 <= i < context.num_blocks]
        if bad:
            raise ValueError(f"skip_layers: {bad} are not blocks of this model (0..{context.num_blocks - 1})")
        notes = ["mixture-of-experts model: attention left whole, every expert, shared expert and dense MLP by Type I"]
        survey = []
        importance = self.block_importances(context, survey)
        hidden = context.config.hidden_size
        whole = [s["weights"] for s in survey]
        compressible = [3 * hidden * sum(width for _, width in s["units"].values()) for s in survey]
        active = [i for i in range(context.num_blocks) if i not in self.skip_layers]
        target = self.ratio * sum(whole) / max(sum(compressible[i] for i in active), 1)
        if self.ratio > 0 and (not active or target > self.max_sparsity):
            raise ValueError(
                f"ratio: {self.ratio} of the blocks' weights cannot be removed from the MLPs of {len(active)} blocks "
                f"with at most {self.max_sparsity} of each removed"
            )
        sparsity = torch.zeros(context.num_blocks, dtype=torch.float64)
        weights = torch.tensor([compressible[i] for i in active], dtype=torch.float64)
        for _ in range(50 if active and target > 0 else 0):  # blocks of unequal MLPs: rescale to remove ``ratio``
            sparsity[active] = allocate_sparsity(importance[active], target, self.smoothing, self.max_sparsity)
            achieved = float((sparsity[active] * weights).sum())
            if abs(achieved - self.ratio * sum(whole)) < 1e-9 * sum(whole):
                break
            target = min(target * self.ratio * sum(whole) / achieved, self.max_sparsity)
        sizes = [
            {
                path: round_to_multiple((1 - float(sparsity[i])) * width, self.round_to, self.round_to, width)
                if i in active
                else width
                for path, (_, width) in s["units"].items()
            }
            for i, s in enumerate(survey)
        ]
        kinds = [kind for s in survey for kind, _ in s["units"].values()]
        removed = [3 * hidden * sum(w - sizes[i][p] for p, (_, w) in s["units"].items()) for i, s in enumerate(survey)]
        return {
            "importance": importance,
            "sparsity": sparsity,
            "sizes": sizes,
            "notes": notes,
            "parameters": (sum(whole), sum(whole) - sum(removed)),
            "counts": {
                "experts": kinds.count("expert"),
                "shared_experts": kinds.count("shared"),
                "moe_layers": sum(any(k == "expert" for k, _ in s["units"].values()) for s in survey),
                "dense_layers": sum(all(k == "dense" for k, _ in s["units"].values()) for s in survey),
            },
            "weights": whole,
        }

    def compress_experts_block(self, context: BlockContext) -> None:
        """Type I on every gated MLP of the block, each on its own tokens: an expert's ``C_sigma`` sums over
        the tokens routed to it (or every token, ``calibration.expert_calibration: all``); the pipeline names
        experts below ``calibration.min_expert_tokens`` in a warning, and an expert no token reached is left
        whole and named in a warning of its own."""
        if "plan" not in context.state:
            context.state["plan"] = self.plan_experts(context)
        plan = context.state["plan"]
        units = mlp_units(context.adapter, context.block)
        if not all(type(linear) is nn.Linear for _, linears in units.values() for linear in linears):
            raise ValueError(
                f"modegpt: block {context.index}'s MLPs are not dense linears (put modegpt before quantizers)"
            )
        sizes = plan["sizes"][context.index]
        if context.index not in self.skip_layers:
            with torch.no_grad():
                with down_correlations({path: linears[2] for path, (_, linears) in units.items()}) as stats:
                    before = context.forward()
                # several processes: each MLP's C_sigma (zeros where this rank's tokens never reached it) is summed
                # at its owner, which solves (None: no token of any rank reached it); owners balanced by width^3
                correlations = {}
                for path, (_, linears) in units.items():
                    width, device = linears[0].out_features, linears[2].weight.device
                    correlations[path] = [
                        stats.get(path, torch.zeros(width, width, dtype=torch.float64, device=device))
                    ]

                def solve(path: str):
                    correlation = correlations[path][0]
                    if not bool(correlation.diagonal().any()):
                        return None
                    gate, up, down = (linear.weight for linear in units[path][1])
                    return nystrom_mlp(gate, up, down, correlation, sizes[path], self.ridge)

                solutions = context.run.distributed.solve_owned(
                    correlations,
                    {path: float(linears[0].out_features ** 3) for path, (_, linears) in units.items()},
                    solve,
                    where=context.prefix,
                    device=context.device,
                )
                unseen = []
                for path, (_, linears) in units.items():
                    if solutions[path] is None:
                        unseen.append(path)
                        before_count, after_count = plan["parameters"]  # the plan counted it compressed
                        width = linears[0].out_features
                        plan["parameters"] = (
                            before_count,
                            after_count + 3 * linears[0].in_features * (width - sizes[path]),
                        )
                        continue
                    mask_neurons(linears, *solutions[path])
                after = context.forward()
            if unseen:
                context.run.report.warn(
                    f"{context.prefix}: modegpt left {', '.join(unseen)} whole: no calibration token reached them "
                    "(use more calibration samples, or calibration.expert_calibration: all)"
                )
            error = sum((a - b).double().pow(2).sum() for a, b in zip(after, before)) / sum(
                b.double().pow(2).sum() for b in before
            )
            hidden = context.config.hidden_size
            kept = {path: sizes[path] for path in units if path not in unseen}
            context.record(
                "block",
                importance=float(plan["importance"][context.index]),
                sparsity=round(float(plan["sparsity"][context.index]), 5),
                intermediate_sizes=sorted(set(kept.values())),
                mlps=len(units),
                left_whole=len(unseen),
                parameters=plan["weights"][context.index]
                - 3 * hidden * sum(linears[0].out_features - kept[p] for p, (_, linears) in units.items() if p in kept),
                block_output_error=math.sqrt(float(error)),
            )
        if context.index == context.num_blocks - 1:
            self.record_totals(context, plan, **plan["counts"])
