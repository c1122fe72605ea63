"""QLLM: adaptive channel reassembly + low-rank error correction, for W4A4 / W4A8 (and weight-only).

Paper: Liu et al., "QLLM: Accurate and Efficient Low-Bitwidth Quantization for Large Language Models",
ICLR 2024, arXiv 2310.08041; official code ModelTC/QLLM. Per decoder block: (1) at the attention
input, the MLP input and down_proj's input, outlier channels are split into T copies of x/T (weight
columns copied) and as many pairs of similar channels merged (activations averaged, columns summed):
a fixed sparse map x'' = P x of width C before the per-token activation quantizer, its size searched
per point (threshold grid, quantized output MSE on calibration features). (2) A rank-r LoRA branch on
every linear and the norm gains train so the quantized block fed the quantized stream reproduces the
fp block on the fp stream; the branch is merged into the weights, which are re-quantized.

Groups (``group_blocks``, official ``--num_layer``, 4 in every script): consecutive blocks go through
the steps together (the session hands them over at once): the fp group on the fp stream gives each
block's point statistics and the group's targets; every block is reassembled; the branches and norms
of the whole group train on the MSE between the quantized group fed the quantized stream and the fp
group's output. After the last group, ``tune_final_norm`` trains the final norm's gain so that
norm(quantized stream) matches norm(fp stream) (official ``tune_last_ln``, same optimiser and schedule).

Defaults (official scripts): weights 4-bit per output channel asymmetric min-max, activations
per-token asymmetric dynamic (Q, K, V too), channel_ratio 0.2, rank 4, alpha 1, AdamW with linear
decay, lr 5e-4 (paper; scripts use 1e-4 for most W4A4 runs), 10 epochs, batch 1, 4 feature samples.
Deviations: ``group_blocks`` defaults to 1 and ``tune_final_norm`` to false (the step's behaviour
before they existed; the shipped recipes set what was measured, docs/methods/qllm.md); the final norm
gets no bias (official: a zero-initialised one, which a stock RMSNorm cannot hold); a group that does
not divide the blocks leaves a shorter last group (official: the remainder is never quantized); the
search scores each candidate with the exact split-then-merge transform it will apply (official: a
merge-then-split approximation) and also evaluates A = 0; merge scores are the code's signed column sums
(``merge_score: code``) or the paper's Eq. 5 (``paper``); weight ranges include 0 (the
compressed-tensors grid); a held-out tenth keeps the best epoch (docs/methods/qllm.md).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from compressor.arch import input_groups
from compressor.blockwise import first_output
from compressor.modules.activations import (
    ActivationSpec,
    ChannelMap,
    apply_channel_map,
    install_attention_quantization,
    quantize_activations,
)
from compressor.quant.uniform import (
    ACTIVATION_BITS,
    ActivationQuantization,
    UniformQuantizer,
    minmax_params,
    quantize_uniform,
    relative_error,
    round_ste,
)
from compressor.step import param, register_step
from compressor.training import (
    block_dtype,
    block_mse,
    cast_floating,
    holdout_count,
    micro_batches,
    slice_batch,
    train_block,
)
from compressor.weights.values import expand_groups

if TYPE_CHECKING:
    from compressor.context import BlockContext
    from compressor.training import BestState


def block_points(adapter) -> dict[str, tuple[str, ...]]:
    """The three reassembly points of a block and their consumers (paths): the attention's input (the
    linears of the attention that read one input: q, k, v, or Phi-3's qkv_proj), the MLP's (gate and up, or a
    fused gate_up_proj) and down_proj's. A norm feeding attention and MLP in parallel (Cohere) is two points."""
    attention, mlp = f"{adapter.attention}.", f"{adapter.mlp}."
    groups = input_groups(adapter)
    return {
        "attn_in": next(
            (tuple(p for p in g if p.startswith(attention)) for g in groups if g[0].startswith(attention)), ()
        ),
        "mlp_in": next(
            (tuple(p for p in g if p.startswith(mlp)) for g in groups if any(x.startswith(mlp) for x in g)), ()
        ),
        "down_in": (adapter.linears["down"],),
    }


# ----------------------------------------------------------------------------------------------
# Channel reassembly: the math on tensors (features x: [tokens, C]; weights W: [N, C])


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """m_c = max(|min_c|, max_c) over every token: [C]."""
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def split_counts(magnitudes: torch.Tensor, threshold: float) -> torch.Tensor:
    """T_c = max(1, ceil(m_c / theta)): how many sub-channels channel c becomes."""
    return torch.ceil(magnitudes / threshold).clamp(min=1).long()


def disassemble(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split channel c into T_c adjacent copies of x_c / T_c, and W's column c into T_c copies: W' x' = W x."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return x[..., owner] / counts[owner].to(x.dtype), weight[:, owner]


def merge_scores(x: torch.Tensor, weight: torch.Tensor, movable: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """Bipartite merge costs [|a|, |b|] between channels a = even indices and b = odd indices of the
    (disassembled) features ``x`` [tokens, C'] and weights ``weight`` [N, C'] (all consumers' rows).
    ``code``: ((u_i + v_j) * ||x_a_i - x_b_j||)^2 with u, v the signed column sums (official code);
    ``paper``: ||x_a_i - x_b_j||^2 * ||W_a_i - W_b_j||^2 / 4, the exact merge error (Eq. 5).
    Channels not ``movable`` (sub-channels of a split) get +inf: they are never merged."""
    x, weight = x.reshape(-1, x.shape[-1]).float(), weight.float()
    a, b = torch.arange(0, x.shape[1], 2), torch.arange(1, x.shape[1], 2)
    distance = torch.cdist(x[:, a].t().contiguous(), x[:, b].t().contiguous())
    if mode == "code":
        sums = weight.sum(dim=0)
        scores = ((sums[a, None] + sums[None, b]) * distance).square()
    elif mode == "paper":
        scores = (distance * torch.cdist(weight[:, a].t().contiguous(), weight[:, b].t().contiguous()) / 2).square()
    else:
        raise ValueError(f"merge_score: {mode!r} is not one of code, paper")
    scores[~movable[a]] = math.inf
    scores[:, ~movable[b]] = math.inf
    return scores


def choose_merges(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``count`` cheapest (source in a, destination in b) pairs, as channel indices: each a-channel's
    best partner, a-channels by that cost. Several sources may share a destination. None when fewer
    than ``count`` a-channels have a finite partner (there is not enough to merge)."""
    best, partner = (
        scores.min(dim=1) if scores.numel() else (scores.new_zeros(0), scores.new_zeros(0, dtype=torch.long))
    )
    if count > int(torch.isfinite(best).sum()):
        return None
    chosen = torch.argsort(best, stable=True)[:count]
    return 2 * chosen, 2 * partner[chosen] + 1


@dataclass
class Reassembly:
    """One point's transform: the map P (x'' = P x), the consumers' rewritten weights, and its sizes."""

    channel_map: ChannelMap
    weights: list[torch.Tensor]  # each consumer's [N, C] weight in the new channel basis
    counts: torch.Tensor  # T_c
    threshold: float

    @property
    def extra(self) -> int:
        """A: channels created by disassembly (= pairs merged)."""
        return int(self.counts.sum()) - len(self.counts)


def reassemble(
    features: torch.Tensor, weights: list[torch.Tensor], magnitudes: torch.Tensor, threshold: float, mode: str = "code"
) -> Reassembly | None:
    """Split channels above ``threshold``, then merge as many pairs as were created (similarity on the
    disassembled ``features`` and concatenated consumer ``weights``). None when too few pairs can merge."""
    channels = len(magnitudes)
    counts = split_counts(magnitudes, threshold)
    extra = int(counts.sum()) - channels
    owner = torch.repeat_interleave(torch.arange(channels), counts)
    x_split, w_split = disassemble(features.reshape(-1, channels).float(), torch.cat(weights).float(), counts)
    movable = counts[owner] == 1
    merges = choose_merges(merge_scores(x_split, w_split, movable, mode), extra) if extra else (owner[:0], owner[:0])
    if merges is None:
        return None
    sources, destinations = merges
    keep = torch.ones(len(owner), dtype=torch.bool)
    keep[sources] = False
    new_index = torch.cumsum(keep, 0) - 1  # channel order: the old order with the sources removed
    group = new_index.clone()
    group[sources] = new_index[destinations]
    sizes = torch.bincount(group, minlength=channels).float()
    coefficient = 1.0 / counts[owner].float() / sizes[group]
    channel_map = ChannelMap.from_entries(group, owner, coefficient, channels, channels)
    rewritten = [
        torch.zeros(w.shape[0], channels, dtype=torch.float32).index_add_(1, group, w.float()[:, owner])
        for w in weights
    ]
    return Reassembly(channel_map, rewritten, counts, float(threshold))


def threshold_candidates(magnitudes: torch.Tensor, budget: int) -> list[tuple[float, int]]:
    """(theta, A) walking theta down from max(m) in (max - min) / max(100, max/0.5) steps, one theta per
    distinct A (the first met), stopping once A exceeds ``budget`` (official ``find_threshold``)."""
    high, low = float(magnitudes.max()), float(magnitudes.min())
    steps = max(100, int(high / 0.5))
    step = (high - low) / steps
    candidates, last = [], None
    for i in range(steps):
        theta = high - i * step
        if theta < low or theta <= 0:
            break
        extra = int(split_counts(magnitudes, theta).sum()) - len(magnitudes)
        if extra > budget:
            break
        if extra != last:
            candidates.append((theta, extra))
            last = extra
    return candidates


@dataclass
class SearchResult:
    best: Reassembly | None  # None: no reassembly (A = 0) was best
    loss: float
    loss_without: float | None  # the A = 0 loss, when evaluated
    evaluated: list[tuple[float, int, float]]  # (theta, A, loss) in search order


def search_threshold(
    features: torch.Tensor,
    weights: list[torch.Tensor],
    magnitudes: torch.Tensor,
    loss_of,
    channel_ratio: float,
    consider_no_reassembly: bool = True,
    mode: str = "code",
    max_candidates: int = 0,
) -> SearchResult:
    """The theta (equivalently A) of smallest quantized output loss ``loss_of(reassembly or None)``,
    among ``threshold_candidates`` with A <= floor(channel_ratio * C) (``max_candidates`` > 0: that many
    of them, evenly spread, always including the largest A)."""
    budget = math.floor(channel_ratio * len(magnitudes))
    best, best_loss, without, evaluated = None, math.inf, None, []
    if consider_no_reassembly:
        without = best_loss = float(loss_of(None))
        evaluated.append((float(magnitudes.max()), 0, best_loss))
    candidates = [(theta, extra) for theta, extra in threshold_candidates(magnitudes, budget) if extra > 0]
    if 0 < max_candidates < len(candidates):
        picks = torch.linspace(len(candidates) - 1, 0, max_candidates).round().long().flip(0).unique().tolist()
        candidates = [candidates[i] for i in picks]
    for theta, extra in candidates:
        plan = reassemble(features, weights, magnitudes, theta, mode)
        if plan is None:  # not enough channels left to merge: a lower theta would need even more
            break
        loss = float(loss_of(plan))
        evaluated.append((theta, extra, loss))
        if loss < best_loss:
            best, best_loss = plan, loss
    return SearchResult(best, best_loss, without, evaluated)


# ----------------------------------------------------------------------------------------------
# The quantized linear of the search and of error correction


def fake_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Min-max RTN of ``weight`` with straight-through rounding; the forward equals
    ``quantize_uniform(weight, ...).dequantize()`` exactly (ranges recomputed from the weight each call)."""
    n, k = weight.shape
    scale, zero = minmax_params(weight.detach(), bits, group_size, symmetric, scale_dtype)
    s = expand_groups(scale.float(), k, group_size)
    z = expand_groups(zero.float(), k, group_size) if zero is not None else 2 ** (bits - 1)
    codes = (round_ste(weight.float() / s) + z).clamp(0, 2**bits - 1)
    return (codes - z) * s


class QLLMLinear(nn.Module):
    """``y = Q_w(W) Q_a(P x) + b`` with an optional LoRA branch: ``Q_w(W) + (alpha/r) B A`` (``post_quant``,
    the official form) or ``Q_w(W + (alpha/r) B A)`` (``pre_quant``, what is deployed after the merge)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantizer: dict,
        activations: ActivationSpec | None,
        channel_map: ChannelMap | None = None,
    ):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.quantizer, self.activations, self.channel_map = quantizer, activations, channel_map
        self.out_features, self.in_features = weight.shape
        self.lora_a = self.lora_b = None
        self.scaling, self.placement = 0.0, "post_quant"
        self._quantized = None  # Q_w(W), cached: W is frozen

    def add_lora(self, rank: int, alpha: float, placement: str, generator: torch.Generator | None = None) -> None:
        """A [r, K] Kaiming-uniform (a = sqrt 5, as nn.Linear), B [N, r] zeros: the branch starts at zero."""
        a = torch.empty(rank, self.in_features)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, K] matrix
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(self.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.scaling, self.placement = alpha / rank, placement

    def quantized_weight(self) -> torch.Tensor:
        if self.lora_a is not None and self.placement == "pre_quant":
            return fake_quantize_weight(self.merged_weight(), **self.quantizer)
        if self._quantized is None or self._quantized.device != self.weight.device:
            self._quantized = fake_quantize_weight(self.weight, **self.quantizer)
        if self.lora_a is None:
            return self._quantized
        return self._quantized + self.scaling * (self.lora_b @ self.lora_a)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A in fp32 (W alone without a branch)."""
        if self.lora_a is None:
            return self.weight
        return self.weight + self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_map is not None:
            m = self.channel_map
            x = apply_channel_map(x, m.crow, m.col, m.val)
        x = quantize_activations(x, self.activations)
        weight = self.quantized_weight()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# The step


def linear_decay(base: float, step: int, total: int) -> float:
    """The official schedule: linear from ``base`` to 0, no warm-up."""
    return base * max(0.0, 1 - step / max(total, 1))


def peak_memory_mib(device: torch.device) -> float:
    """The high-water mark of device memory (CUDA) or of the process's resident memory (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Correction:
    """What a block's error correction leaves for its report row."""

    batches: list[tuple]  # (input, target, kwargs): the final quantized block is measured on them too
    mse_init: float
    mse_trained: float
    steps: int
    losses: list[float]  # mean training loss per epoch
    best: BestState | None
    peak_memory_mib: float


@register_step("qllm")
@dataclass
class QLLM(ActivationQuantization, UniformQuantizer):
    """QLLM: channel reassembly of activation outliers + low-rank error correction per block (W4A4, W4A8, W4)."""

    # reassembly splits outlier channels against the per-token range; on FP4 grids (blocks of 16/32 channels with
    # their own scales) it lowers the blocks' maxima the same way. Weights stay on QLLM's integer grid.
    activation_grids = ("int", "nvfp4", "mxfp4")
    # several processes: channel ranges all-reduced (max), each point searched by one owner on the first samples'
    # features (rank 0's, broadcast), error correction in the single process's steps (training.train_block)
    distributes = "gradients"

    group_size: int = param(-1, "input columns sharing one weight scale; -1 (the paper's): one per output row")
    symmetric: bool = param(False, "symmetric weight grid (false: per-row zero points, as the paper)")
    activation_bits: int | None = param(
        None,
        "per-token dynamic quantization of every linear's input (and Q, K, V); default 4, 16 (off) with weight_only",
        choices=(None, *ACTIVATION_BITS),
    )
    weight_only: bool = param(
        False, "activations stay 16-bit: reassembly off, error correction kept; exports as compressed-tensors"
    )
    reassembly: bool | None = param(
        None, "channel reassembly at the three points of each block (default: on unless activations are 16-bit)"
    )
    channel_ratio: float = param(
        0.2, "at most this fraction of a point's channels is reassembled (A <= floor(ratio * C))", min=0.0, max=0.5
    )
    merge_score: str = param(
        "code",
        "channel-pair merge cost: the official code's signed column sums, or the paper's Eq. 5",
        choices=("code", "paper"),
    )
    consider_no_reassembly: bool = param(True, "the search also scores A = 0 (the official search never does)")
    search_candidates: int = param(
        0,
        "at most this many thresholds scored per point, spread over the candidates (0: all, as the official search)",
        min=0,
    )
    feature_samples: int = param(
        4, "calibration samples whose activations the search and the pair similarity use", min=1
    )
    rank: int = param(4, "rank of the error-correction branch of every linear (0: no error correction)", min=0)
    alpha: float = param(1.0, "the branch is scaled by alpha / rank", min=0.0)
    lora_placement: str = param(
        "post_quant",
        "training form: Q(W) + BA (official) or Q(W + BA) (what is deployed)",
        choices=("post_quant", "pre_quant"),
    )
    epochs: int = param(10, "passes over the calibration samples per block for error correction", min=0)
    lr: float = param(5e-4, "AdamW learning rate of the branches and norm gains (linear decay to 0)", min=0.0)
    batch_size: int = param(1, "samples per optimizer step", min=1)
    train_norms: bool = param(True, "also train the block's norm gains and biases (the official code does)")
    heldout: float = param(
        0.1,
        "fraction of each block's calibration batches held out to keep the best epoch (0: keep the last)",
        min=0.0,
        max=0.5,
    )
    seed: int = param(0, "seed of the branches' initialisation", min=0)
    group_blocks: int = param(
        1,
        "consecutive blocks reassembled and corrected together, trained against the group's fp output (paper: 4)",
        min=1,
    )
    tune_final_norm: bool = param(
        False, "after the last block, train the final norm's gain so it maps the quantized stream onto the fp one"
    )

    def check(self) -> None:
        super().check()
        if self.weight_only and self.activation_bits not in (None, 16):
            raise ValueError(
                f"activation_bits: {self.activation_bits} contradicts weight_only: true (activations stay 16-bit)"
            )
        if self.weight_only and self.activation_grid != "int":
            raise ValueError(
                f"activation_grid: {self.activation_grid} contradicts weight_only: true (activations stay 16-bit)"
            )
        if self.activation_global_scale == "calibrated":
            raise ValueError(
                "activation_global_scale: qllm's channel maps are recorded by our native format only, whose NVFP4 "
                "activations take their global scale per token; drop activation_global_scale"
            )
        if self.reassembly and self.bits_of_activations == 16:
            raise ValueError(
                "reassembly: channel reassembly only serves activation quantization; it needs activation_bits below 16"
            )

    def check_model(self, linears: dict) -> None:
        super().check_model(linears)
        for name, linear in linears.items():
            if self.rank > min(linear.in_features, linear.out_features):
                raise ValueError(
                    f"rank: {self.rank} is more than {name}'s smaller side "
                    f"({linear.out_features}x{linear.in_features}); a branch of full rank corrects every error it can"
                )

    @property
    def bits_of_activations(self) -> int:
        if self.activation_grid != "int":
            return 4
        if self.activation_bits is not None:
            return self.activation_bits
        return 16 if self.weight_only else 4

    @property
    def activation_spec(self) -> ActivationSpec | None:
        if self.activation_grid != "int":
            return super().activation_spec
        bits = self.bits_of_activations
        return None if bits == 16 else ActivationSpec(bits, self.activation_symmetric)

    @property
    def reassembles(self) -> bool:
        return self.bits_of_activations < 16 if self.reassembly is None else self.reassembly

    @property
    def weight_quantizer(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @property
    def blocks_per_call(self) -> int:
        return self.group_blocks

    def compress_block(self, context: BlockContext) -> None:
        self.compress_group([context])

    def compress_group(self, contexts: list[BlockContext]) -> None:
        """Consecutive blocks together: the fp group on the fp stream gives the targets and each block's point
        statistics; each block's points are reassembled; the branches of every linear of the group (and its norms)
        train so that the quantized group fed the quantized stream reproduces the fp group's output."""
        for context in contexts:
            self.refuse_other_weight_kinds(context)
        started = time.perf_counter()
        quantizer = {**self.weight_quantizer, "scale_dtype": contexts[0].scale_dtype}
        spec = self.activation_spec
        linears = [context.linears(self.ignore) for context in contexts]
        points = [self.reassembly_points(context.adapter, found) for context, found in zip(contexts, linears)]
        stats, targets = self.teacher_pass(contexts, points)
        dtype = block_dtype(contexts[0].block)
        plans = []
        for context, found, point, stat in zip(contexts, linears, points, stats):
            context.block.float()  # search and training in fp32
            channel_maps, rewritten = self.search_reassembly(context, point, found, stat, quantizer, spec)
            originals = {name: linear.weight.detach().clone() for name, linear in found.items()}
            plans.append((channel_maps, rewritten, originals))
        group, modules, correction = self.correct_errors(contexts, linears, plans, targets, quantizer, spec)
        for context, found, (channel_maps, rewritten, originals) in zip(contexts, modules, plans):
            self.merge_and_quantize(context, found, originals, rewritten, channel_maps, dtype)
        self.record_correction(contexts, group, correction, started)
        if self.tune_final_norm and contexts[-1].index == contexts[-1].num_blocks - 1:
            self.correct_final_norm(contexts[-1], group, correction.batches)

    def reassembly_points(self, adapter, linears: dict[str, nn.Linear]) -> dict[str, list[str]]:
        """Each reassembly point whose consumers are all in ``linears`` -> their paths (none without reassembly).
        A mixture-of-experts MLP has no such roles (its input also feeds the router): only attention's input."""
        if not self.reassembles:
            return {}
        points = block_points(adapter)
        return {point: list(names) for point, names in points.items() if names and all(n in linears for n in names)}

    def teacher_pass(
        self, contexts: list[BlockContext], points: list[dict[str, list[str]]]
    ) -> tuple[list[PointStatistics], list[torch.Tensor]]:
        """The fp blocks on the fp stream, one after the other: the group's targets (and the next group's fp
        inputs), and the statistics of each block's points."""
        first, last = contexts[0], contexts[-1]
        stream = first.inputs if first.index == 0 else first.state["fp_inputs"]
        stats = []
        for context, point in zip(contexts, points):
            stats.append(
                PointStatistics(context.block, {p: names[0] for p, names in point.items()}, self.feature_samples)
            )
            with stats[-1]:
                stream = context.forward(inputs=stream)
        first.state["fp_inputs"] = None if last.index == last.num_blocks - 1 else stream
        return stats, stream

    def search_reassembly(
        self,
        context: BlockContext,
        points: dict[str, list[str]],
        linears: dict[str, nn.Linear],
        stats: PointStatistics,
        quantizer: dict,
        spec: ActivationSpec | None,
    ) -> tuple[dict, dict]:
        """Channel reassembly, point by point, on the fp features: each consumer's channel map and
        rewritten weight (path -> tensor), for the points where reassembling beat leaving them."""
        distributed = context.run.distributed
        for point in points:  # several processes: every rank's channel ranges, the first samples' features
            distributed.all_reduce_max(stats.magnitudes[point])
        stats.chunks = distributed.broadcast_object(stats.chunks, 0, context.device)

        def search(point: str):
            names = points[point]
            weights = [linears[name].weight.detach().float() for name in names]
            loss_of = point_loss(
                point,
                context.block,
                context.adapter,
                names,
                linears,
                stats,
                context.block_kwargs,
                quantizer,
                spec,
                self.quantize_attention,
            )
            result = search_threshold(
                stats.features[point],
                weights,
                stats.magnitudes[point],
                loss_of,
                self.channel_ratio,
                self.consider_no_reassembly,
                self.merge_score,
                self.search_candidates,
            )
            context.record(
                f"reassembly.{point}",
                extra_channels=0 if result.best is None else result.best.extra,
                threshold=None if result.best is None else result.best.threshold,
                max_magnitude=float(stats.magnitudes[point].max()),
                loss=result.loss,
                loss_without=result.loss_without,
                candidates=len(result.evaluated),
            )
            return result.best

        # each point's search on its owner (they are independent), costs by the point's width and consumers
        found = distributed.solve_owned(
            {point: [] for point in points},
            {point: float(stats.magnitudes[point].numel() * len(names)) for point, names in points.items()},
            search,
            context.run.report,
            context.prefix,
            context.device,
        )
        channel_maps, rewritten = {}, {}
        for point, best in found.items():
            if best is not None:
                for name, weight in zip(points[point], best.weights):
                    channel_maps[name], rewritten[name] = best.channel_map, weight
        stats.release()
        return channel_maps, rewritten

    def correct_errors(
        self,
        contexts: list[BlockContext],
        linears: list[dict[str, nn.Linear]],
        plans: list[tuple[dict, dict, dict]],
        targets: list[torch.Tensor],
        quantizer: dict,
        spec: ActivationSpec | None,
    ) -> tuple[BlockGroup, list[dict[str, QLLMLinear]], Correction]:
        """Every linear of the group becomes Q_w(W) Q_a(P x) (+ LoRA); the branches and norms train towards
        ``targets``, the fp group's output."""
        modules = []
        for context, found, (channel_maps, rewritten, _) in zip(contexts, linears, plans):
            block, replaced = context.block, {}
            for name, linear in found.items():
                weight = rewritten.get(name, linear.weight.detach())
                replaced[name] = QLLMLinear(weight, linear.bias, quantizer, spec, channel_maps.get(name))
                block.set_submodule(name, replaced[name])
            if spec is not None and self.quantize_attention:
                install_attention_quantization(block.get_submodule(context.adapter.attention), spec)
            modules.append(replaced)
        first = contexts[0]
        distributed = first.run.distributed  # several processes: the single process's steps (training.py)
        group = BlockGroup([context.block for context in contexts])
        batches = micro_batches(
            first.inputs, targets, group.kwargs([c.block_kwargs for c in contexts]), self.batch_size
        )
        if first.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(first.device)
        mse_init = block_mse(group, batches, distributed)
        losses, best, steps = [], None, 0
        if self.rank > 0 and self.epochs > 0:
            generator = torch.Generator().manual_seed(self.seed + first.index)
            for module in (module for replaced in modules for module in replaced.values()):
                module.add_lora(self.rank, self.alpha, self.lora_placement, generator)
            groups = [{"params": trainable_parameters(group, self.train_norms), "lr": self.lr}]
            steps = self.epochs * (len(batches) - holdout_count(len(batches), self.heldout))
            with first.progress(steps, "error correction", "step") as progress:
                losses, best = train_block(
                    group,
                    batches,
                    groups,
                    self.epochs,
                    1.0,
                    self.heldout,
                    progress,
                    schedule=linear_decay,
                    where="qllm",
                    distributed=distributed,
                    batch_size=self.batch_size,
                )
        mse_trained = block_mse(group, batches, distributed)
        correction = Correction(batches, mse_init, mse_trained, steps, losses, best, peak_memory_mib(first.device))
        return group, modules, correction

    def merge_and_quantize(
        self,
        context: BlockContext,
        modules: dict[str, QLLMLinear],
        originals: dict,
        rewritten: dict,
        channel_maps: dict,
        dtype: torch.dtype,
    ) -> None:
        """Merge each branch into its weight and quantize the result: no extra matmul at inference."""
        values = {
            name: quantize_uniform(
                module.merged_weight().detach(), self.bits, self.group_size, self.symmetric, context.scale_dtype
            )
            for name, module in modules.items()
        }
        context.block.to(dtype)
        quantized = {}
        for name, value in values.items():
            quantized[name] = context.replace_linear(name, value)
            reference = originals[name] if name not in rewritten else rewritten[name]
            context.record(name, error=relative_error(reference, value), bits_per_weight=value.bits_per_weight())
        self.quantize_block_activations(context, quantized, channel_maps)

    @staticmethod
    def record_correction(
        contexts: list[BlockContext], group: BlockGroup, correction: Correction, started: float
    ) -> None:
        """The group's ``error_correction`` row (on its first block): its MSE before and after training and once
        quantized."""
        losses, best = correction.losses, correction.best
        contexts[0].record(
            "error_correction",
            blocks=[context.index for context in contexts],
            mse_init=correction.mse_init,
            mse_trained=correction.mse_trained,
            mse_final=block_mse(group, correction.batches, contexts[0].run.distributed),
            steps=correction.steps,
            loss_first_epoch=losses[0] if losses else None,
            loss_last_epoch=losses[-1] if losses else None,
            peak_memory_mib=round(correction.peak_memory_mib, 1),
            seconds=time.perf_counter() - started,
            **(best.summary() if best else {}),
        )

    def correct_final_norm(self, context: BlockContext, group: BlockGroup, batches: list[tuple]) -> None:
        """The official ``tune_last_ln``: the final norm's gain trains (same optimiser, epochs, learning rate and
        schedule as the blocks) so that norm(quantized stream) matches norm_fp(fp stream) in MSE. No bias is added
        (official default: a zero-initialised one, which a stock RMSNorm cannot hold)."""
        path = context.adapter.final_norm
        norm = context.handle.model.get_submodule(path)
        if any(p.is_meta for p in norm.parameters()):
            context.handle.materialize(path, context.device, context.compute_dtype)
        dtype, group_dtype = block_dtype(norm), block_dtype(group)
        norm.float()
        with torch.no_grad():
            pairs = [
                (first_output(group(x.to(group_dtype), **cast_floating(kw, group_dtype))).float(), norm(y.float()), {})
                for x, y, kw in batches
            ]
        gains = list(norm.parameters())
        norm.requires_grad_(True)
        distributed = context.run.distributed  # several processes: the single process's steps, as the blocks
        before = block_mse(norm, pairs, distributed)
        losses, best = train_block(
            norm,
            pairs,
            [{"params": gains, "lr": self.lr}],
            self.epochs,
            1.0,
            self.heldout,
            schedule=linear_decay,
            where="qllm final norm",
            distributed=distributed,
            batch_size=self.batch_size,
        )
        context.run.report.add_row(
            step=self.name,
            module=path,
            mse_init=before,
            mse_final=block_mse(norm, pairs, distributed),
            loss_last_epoch=losses[-1] if losses else None,
            **(best.summary() if best else {}),
        )
        norm.to(dtype)


class BlockGroup(nn.Module):
    """Consecutive blocks as one module for the reconstruction loop: ``forward(x, per_block=[kwargs...])``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    @staticmethod
    def kwargs(per_block: list[list[dict]]) -> list[dict]:
        """The blocks' keyword arguments (per block, per batch) as the group's (per batch)."""
        return [{"per_block": list(batch)} for batch in zip(*per_block)]

    def forward(self, hidden_states: torch.Tensor, per_block: list[dict]) -> torch.Tensor:
        for block, kwargs in zip(self.blocks, per_block):
            hidden_states = first_output(block(hidden_states, **kwargs))
        return hidden_states


def trainable_parameters(block: nn.Module, train_norms: bool) -> list[nn.Parameter]:
    """The LoRA factors, and with ``train_norms`` the norm gains and biases (the official trainable set);
    nothing else of the block requires grad afterwards."""
    block.requires_grad_(False)
    chosen = []
    for name, parameter in block.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b") or (train_norms and ("norm" in name or leaf == "bias")):
            parameter.requires_grad_(True)
            chosen.append(parameter)
    return chosen


class PointStatistics:
    """Forward pre-hooks on the first consumer of each point: per-channel magnitudes over every sample,
    and the activations (with their batch index and rows) of the first ``samples`` samples."""

    def __init__(self, block: nn.Module, first_consumers: dict[str, str], samples: int):
        self.block, self.first, self.samples = block, first_consumers, samples
        self.magnitudes: dict[str, torch.Tensor] = {}
        self.chunks: dict[str, list[tuple[int, int, torch.Tensor]]] = {
            p: [] for p in first_consumers
        }  # (batch, its size, rows kept)
        self.batch = 0
        self.hooks = []

    def __enter__(self):
        for point, name in self.first.items():
            self.hooks.append(self.block.get_submodule(name).register_forward_pre_hook(self.catcher(point)))
        self.hooks.append(self.block.register_forward_hook(lambda *args: setattr(self, "batch", self.batch + 1)))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def catcher(self, point: str):
        def catch(module, args):
            x = args[0].detach()
            m = channel_magnitudes(x)
            self.magnitudes[point] = m if point not in self.magnitudes else torch.maximum(self.magnitudes[point], m)
            kept = sum(len(chunk) for _, _, chunk in self.chunks[point])
            if kept < self.samples:
                take = min(self.samples - kept, x.shape[0])
                self.chunks[point].append((self.batch, x.shape[0], x[:take].float().clone()))

        return catch

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Each point's stored activations, flattened to [tokens, C]."""
        return {p: torch.cat([c.reshape(-1, c.shape[-1]) for _, _, c in chunks]) for p, chunks in self.chunks.items()}

    def release(self) -> None:
        self.chunks = {}


def point_loss(
    point: str,
    block: nn.Module,
    adapter,
    names: list[str],
    linears: dict,
    stats: PointStatistics,
    block_kwargs,
    quantizer: dict,
    spec: ActivationSpec | None,
    quantize_attention: bool,
):
    """``loss_of(reassembly or None)``: MSE between the fp function of the point on its stored features
    and the same function with the consumers quantized (weights and activations) after the transform."""
    chunks = stats.chunks[point]

    def quantized_consumers(plan):
        weights = plan.weights if plan is not None else [linears[n].weight.detach() for n in names]
        cmap = plan.channel_map if plan is not None else None
        return [QLLMLinear(w, linears[n].bias, quantizer, spec, cmap) for n, w in zip(names, weights)]

    if point == "attn_in":
        run = attention_runner(block, adapter, names, chunks, block_kwargs, spec, quantize_attention)
        reference = run([linears[n] for n in names], quantized=False)
        return lambda plan: mse_of(run(quantized_consumers(plan), quantized=True), reference)

    features = [x for _, _, x in chunks]
    if point == "mlp_in":
        run = mlp_runner(block, adapter, names, features)
        reference = run([float_linear(linears[n]) for n in names])
        return lambda plan: mse_of(run(quantized_consumers(plan)), reference)

    reference = [float_linear(linears[names[0]])(x).detach() for x in features]

    def down(plan):
        (consumer,) = quantized_consumers(plan)
        with torch.no_grad():
            return mse_of([consumer(x) for x in features], reference)

    return down


def attention_runner(
    block: nn.Module,
    adapter,
    names: list[str],
    chunks: list,
    block_kwargs,
    spec: ActivationSpec | None,
    quantize_attention: bool,
):
    """``run(consumers, quantized)``: the block's attention output before o_proj on the stored ``chunks``,
    with ``consumers`` in place of q, k and v (Q, K, V quantized at ``spec`` when ``quantized``); the
    attention is restored afterwards."""
    attention = block.get_submodule(adapter.attention)
    prefix = f"{adapter.attention}."
    paths = [n[len(prefix) :] for n in names]

    def run(consumers, quantized):
        saved = [attention.get_submodule(p) for p in paths]
        o_path = adapter.linears["o"][len(prefix) :]
        saved_o = attention.get_submodule(o_path)
        try:
            for p, module in zip(paths, consumers):
                attention.set_submodule(p, module)
            attention.set_submodule(o_path, nn.Identity())
            if quantized and spec is not None and quantize_attention:
                install_attention_quantization(attention, spec)
            outputs = []
            with torch.no_grad():
                for batch, size, x in chunks:
                    kwargs = cast_floating(slice_batch(block_kwargs[batch], slice(0, len(x)), size), torch.float32)
                    outputs.append(first_output(attention(hidden_states=x, **kwargs)).float())
            return outputs
        finally:
            install_attention_quantization(attention, None)
            for p, module in zip(paths, saved):
                attention.set_submodule(p, module)
            attention.set_submodule(o_path, saved_o)

    return run


def mlp_runner(block: nn.Module, adapter, names: list[str], features: list[torch.Tensor]):
    """``run(consumers)``: the block's MLP up to down_proj's input (``act(gate) * up`` for SwiGLU, whatever the
    family computes there) on ``features``, with ``consumers`` in place of the MLP's input linears ``names``."""
    mlp = block.get_submodule(adapter.mlp)
    prefix = f"{adapter.mlp}."
    paths = [n[len(prefix) :] for n in names]
    down_path = adapter.linears["down"][len(prefix) :]

    def run(consumers):
        saved = [mlp.get_submodule(p) for p in paths]
        saved_down = mlp.get_submodule(down_path)
        try:
            for p, consumer in zip(paths, consumers):
                mlp.set_submodule(p, consumer if isinstance(consumer, nn.Module) else _Call(consumer))
            mlp.set_submodule(down_path, nn.Identity())
            with torch.no_grad():
                return [mlp(x.float()).float() for x in features]
        finally:
            for p, module in zip(paths, saved):
                mlp.set_submodule(p, module)
            mlp.set_submodule(down_path, saved_down)

    return run


class _Call(nn.Module):
    """A function as a module (a consumer in fp32 put in a linear's place)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def float_linear(linear: nn.Linear):
    weight, bias = linear.weight.detach().float(), None if linear.bias is None else linear.bias.detach().float()
    return lambda x: F.linear(x.float(), weight, bias)


def mse_of(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    total = sum(float((o.float() - r.float()).square().sum()) for o, r in zip(outputs, reference))
    return total / sum(r.numel() for r in reference)
