"""BFP: block floating point with outlier-channel rearrangement ("K-sort"), for the KV cache and weights.

Paper: Trukhanov & Soloveychik, *Accurate Block Quantization in LLMs with Outliers*, arXiv 2403.20137
(no official code). Format: blocks of ``n`` values share one 8-bit exponent, each value an
``m``-bit signed mantissa (``weights.values.bfp_encode``; microxcaling's MXINT rule, MXINT8 = m 8,
n 32). K-sort: a few key channels are large for almost every token; gathering channels of similar
magnitude into the same blocks stops the large ones from flushing the small ones to zero. The
permutation is applied to the post-RoPE keys entering the cache and undone as they leave
(``kvcache/bfp.py``): attention is exact for any permutation, and the weights stay untouched.

Defaults and deviations: keys at 4-bit mantissas (the paper's BFP12), n 32, values unquantized
(the paper quantizes keys); the sort statistic is the per-channel RMS of the calibration keys after
RoPE (``act_rms``), not the paper's data-free W_k row norms (``weight_norm``, available), because the
row norm bounds the pre-RoPE key and ignores the input's massive dimensions; ``scope: token`` cuts
blocks over the layer's whole key vector (all KV heads), not per head (``scope: head``, the paper's):
with n >= head_dim a per-head sort changes nothing. ``refine: greedy`` (off; the notes' ablation) swaps
channels between blocks from the sorted order while the query-weighted error of the calibration keys
falls. BFP weights (``weight_bits``): blocks along the input dimension of every linear not in
``ignore``. Reasons and measured numbers: docs/methods/bfp.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compressor.arch import attention_geometry, projection_weight
from compressor.distributed import RowSample
from compressor.kvcache.bfp import SCOPES, BFPCacheSpec
from compressor.step import Step, param, register_step
from compressor.weights.values import BFP_BLOCK_SIZES, BFP_MANTISSA_BITS, BFP_ROUNDING, BFPWeight, bfp_quantize

if TYPE_CHECKING:
    from compressor.context import BlockContext

STATS = ("act_rms", "act_absmax", "weight_norm", "none")
OPTIONAL_BITS = [None, *BFP_MANTISSA_BITS]


# ----------------------------------------------------------------------------------------------
# K-sort: channel statistics and the permutation


def channel_stat(keys: torch.Tensor, stat: str) -> torch.Tensor:
    """Per-channel magnitude [C] of keys [..., C] over every token: RMS or max |k|."""
    flat = keys.reshape(-1, keys.shape[-1]).float()
    if stat == "act_rms":
        return flat.square().mean(0).sqrt()
    if stat == "act_absmax":
        return flat.abs().amax(0)
    raise ValueError(f"ksort: {stat!r} is not a key statistic (act_rms, act_absmax)")


def weight_norm_stat(k_weight: torch.Tensor) -> torch.Tensor:
    """The paper's data-free statistic: the L2 norm of each row of W_k [H_kv * D, hidden]."""
    return k_weight.float().norm(dim=1)


def ksort_permutation(stat: torch.Tensor, head_dim: int, scope: str = "token") -> torch.Tensor:
    """int32 [C]: the order of the layer's key channels, largest statistic first (stable, so ties keep
    their order); position a of the stored vector holds channel perm[a]. ``scope: head`` sorts within
    each head (channels never leave their head); ``token`` sorts all C channels together."""
    if scope not in SCOPES:
        raise ValueError(f"scope: {scope!r} is not one of {', '.join(SCOPES)}")
    if scope == "token":
        return torch.sort(stat, descending=True, stable=True).indices.to(torch.int32)
    heads = stat.numel() // head_dim
    order = torch.sort(stat.reshape(heads, head_dim), dim=1, descending=True, stable=True).indices
    return (order + torch.arange(heads).unsqueeze(1) * head_dim).flatten().to(torch.int32)


def bfp_key_error(
    keys: torch.Tensor, bits: int, block_size: int, perm: torch.Tensor | None = None, rounding: str = "nearest_even"
) -> dict:
    """Error of BFP-stored keys [..., C] (after ``perm``, compared in the original order): relative
    MSE and the channel-normalised MSE (each channel's error over its own mean square)."""
    keys = keys.reshape(-1, keys.shape[-1]).float()
    stored = keys if perm is None else keys[:, perm.long()]
    restored = bfp_quantize(stored, bits, block_size, rounding)
    if perm is not None:
        restored = restored[:, torch.argsort(perm.long())]
    error = (restored - keys).square()
    power = keys.square().mean(0).clamp(min=1e-30)
    return {
        "relative_mse": float(error.sum() / keys.square().sum().clamp(min=1e-30)),
        "channel_mse": float((error.mean(0) / power).mean()),
    }


def query_weights(query_energy: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[C] weight of each key channel in the attention logits: the mean square of the (pre-RoPE)
    queries that meet it, summed over the query heads of its GQA group, each rotary pair's energy
    shared by its two channels (RoPE mixes them by the position; over many positions each gets about
    half). ``query_energy``: [heads * head_dim] per-channel mean squares of ``q_proj``'s output."""
    heads = query_energy.numel() // head_dim
    energy = query_energy.float().reshape(kv_heads, heads // kv_heads, head_dim).sum(1)
    half = head_dim // 2
    pair = (energy[:, :half] + energy[:, half:]) / 2
    return torch.cat([pair, pair], dim=1).flatten()


def block_errors(
    keys: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, bits: int, block_size: int, rounding: str
) -> torch.Tensor:
    """[C / n] query-weighted squared BFP error of each stored block: sum over tokens and the block's
    channels of ``w_c (k_c - k^_c)^2`` (``keys`` [T, C] in the original channel order)."""
    stored, w = keys[:, perm.long()], weights[perm.long()]
    error = (bfp_quantize(stored, bits, block_size, rounding) - stored).square().sum(0) * w
    return error.reshape(-1, block_size).sum(1)


def refine_permutation(
    keys: torch.Tensor,
    weights: torch.Tensor,
    perm: torch.Tensor,
    bits: int,
    block_size: int,
    head_dim: int,
    scope: str,
    trials: int,
    seed: int = 0,
    rounding: str = "nearest_even",
) -> tuple[torch.Tensor, float, float]:
    """Greedy swaps between blocks from ``perm`` (the notes' ``refine: greedy``): ``trials`` times, swap
    two channels of two different blocks (of the same head with ``scope: head``) and keep the swap when
    the query-weighted BFP error of the two blocks (``block_errors``, the first-order error of the
    attention logits) falls. Returns the permutation and the objective before and after; the result
    is never worse than ``perm`` on ``keys``."""
    keys, perm = keys.float(), perm.clone().long()
    blocks = perm.numel() // block_size
    per_group = head_dim // block_size if scope == "head" else blocks  # blocks a swap may choose between
    errors = block_errors(keys, weights, perm, bits, block_size, rounding)
    before = float(errors.sum())
    if per_group < 2:  # one block per head: no swap is legal
        return perm.to(torch.int32), before, before
    generator = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        group = int(torch.randint(blocks // per_group, (1,), generator=generator))
        first, second = (group * per_group + torch.randperm(per_group, generator=generator)[:2]).tolist()
        a = first * block_size + int(torch.randint(block_size, (1,), generator=generator))
        b = second * block_size + int(torch.randint(block_size, (1,), generator=generator))
        trial = perm.clone()
        trial[a], trial[b] = perm[b], perm[a]
        touched = torch.cat(
            [
                trial[first * block_size : (first + 1) * block_size],
                trial[second * block_size : (second + 1) * block_size],
            ]
        )
        new = block_errors(keys, weights, touched, bits, block_size, rounding)
        if float(new.sum()) < float(errors[first] + errors[second]):
            perm, errors[first], errors[second] = trial, new[0], new[1]
    return perm.to(torch.int32), before, float(errors.sum())


class KeyRecorder:
    """Stands in for the cache during a block's forward: accumulates per-channel statistics of the keys
    the attention would cache (after RoPE and, for Qwen3, its k_norm), keeps up to ``sample_tokens`` of
    them for the error report, and hands them back unchanged."""

    def __init__(self, sample_tokens: int = 4096):
        self.sum_squares = self.absmax = None
        self.query_squares = None  # per-channel sum of squares of q_proj's output, when hooked
        self.query_width = None  # how many of the hooked projection's outputs are queries (None: all)
        self.tokens = 0
        self.sample: list[torch.Tensor] = []
        self.sample_tokens = sample_tokens

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        b, h, t, d = key_states.shape
        flat = key_states.detach().transpose(1, 2).reshape(b * t, h * d).float()
        squares, absmax = flat.square().sum(0).cpu(), flat.abs().amax(0).cpu()
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        self.tokens += b * t
        kept = sum(len(s) for s in self.sample)
        if kept < self.sample_tokens:
            self.sample.append(flat[: self.sample_tokens - kept].cpu())
        return key_states, value_states

    def reduce(self, distributed) -> None:
        """Every rank's statistics (several processes, ``compressor/distributed.py``): sums add, maxima take the
        largest, so each rank sorts the channels as one process over all the tokens would. With the queries
        recorded (``refine: greedy``), their sums of squares add too, and the key sample becomes the single
        process's (the first ``sample_tokens`` of all the tokens, each rank's rows in place), so every rank's
        greedy search makes the single process's swaps."""
        if self.query_squares is not None:
            total, first = distributed.rows_of_everyone(self.tokens)
            sample = RowSample(first, 1, min(self.sample_tokens, total))
            sample.add(torch.cat(self.sample))
            self.sample = [distributed.all_reduce_sum(sample.rows)]
            distributed.all_reduce_sum(self.query_squares)
        distributed.all_reduce_sum(self.sum_squares)
        distributed.all_reduce_max(self.absmax)
        self.tokens = int(distributed.all_reduce_sum(torch.tensor([self.tokens], dtype=torch.float64)))

    def stat(self, stat: str) -> torch.Tensor:
        """Per-channel ``act_rms`` or ``act_absmax`` over every calibration token."""
        if stat == "act_rms":
            return (self.sum_squares / self.tokens).sqrt()
        if stat == "act_absmax":
            return self.absmax
        raise ValueError(f"ksort: {stat!r} is not a key statistic (act_rms, act_absmax)")

    def record_queries(self, module, args, output) -> None:
        width = self.query_width or output.shape[-1]  # a fused qkv_proj's first rows are the queries
        squares = output.detach()[..., :width].reshape(-1, width).float().square().sum(0).cpu()
        self.query_squares = squares if self.query_squares is None else self.query_squares + squares

    def query_energy(self) -> torch.Tensor:
        """Per-channel mean square of the recorded queries (pre-RoPE)."""
        return self.query_squares / self.tokens


def query_projection(adapter, block):
    """The module whose output holds the queries (in its first rows): q_proj, or a fused qkv_proj."""
    role = "q" if "q" in adapter.linears else next(name for name, parts in adapter.fused.items() if "q" in parts)
    return block.get_submodule(adapter.linears[role])


def record_calibration_keys(
    block, inputs: list[torch.Tensor], block_kwargs: list[dict], q_proj=None, query_width: int | None = None
) -> KeyRecorder:
    """Run ``block`` on the calibration inputs with a ``KeyRecorder`` as its cache (and, given
    ``q_proj``, the mean squares of its first ``query_width`` outputs: all of them when None)."""
    recorder = KeyRecorder()
    recorder.query_width = query_width
    hook = q_proj.register_forward_hook(recorder.record_queries) if q_proj is not None else None
    try:
        with torch.no_grad():
            for hidden, kwargs in zip(inputs, block_kwargs):
                block(
                    hidden,
                    **{
                        **{k: v for k, v in kwargs.items() if k != "past_key_values"},
                        "cache": recorder,
                        "use_cache": True,
                    },
                )
    finally:
        if hook is not None:
            hook.remove()
    if not recorder.tokens:
        raise ValueError("the attention never handed its keys to the cache: bfp needs Llama-family attention")
    return recorder


# ----------------------------------------------------------------------------------------------
# The recipe step


@register_step("bfp")
@dataclass
class BFP(Step):
    """Block floating point: a BFP KV cache with K-sort (keys grouped by channel magnitude), and/or BFP weights."""

    # several processes: key-channel sums and maxima (and, for refine: greedy, the query energies and the key
    # sample the search runs on) are all-reduced (KeyRecorder.reduce); every rank computes the same order
    distributes = "ranges"

    k_bits: int | None = param(
        4,
        "key mantissa bits (sign included) of the BFP KV cache; null: the cache stays unquantized",
        choices=OPTIONAL_BITS,
    )
    v_bits: int | None = param(None, "value mantissa bits; null keeps values in the model dtype", choices=OPTIONAL_BITS)
    block_size: int = param(32, "cache values sharing one 8-bit exponent", choices=BFP_BLOCK_SIZES)
    ksort: str = param(
        "act_rms",
        "key-channel order: act_rms / act_absmax of the calibration keys after RoPE, weight_norm (the paper's "
        "data-free W_k row norms), none",
        choices=STATS,
    )
    scope: str = param(
        "token", "cache blocks over the layer's whole key vector (token) or within each KV head (head)", choices=SCOPES
    )
    refine: str = param(
        "none",
        "greedy: from the K-sort order, swap channels between blocks while the query-weighted BFP error of the "
        "calibration keys falls (an ablation of the notes; the paper only sorts)",
        choices=("none", "greedy"),
    )
    refine_trials: int = param(2000, "swaps tried per layer by refine: greedy", min=1)
    quantize_fresh: bool = param(True, "tokens of the current forward (the prompt) attend to their own BFP keys too")
    weight_bits: int | None = param(
        None, "mantissa bits of BFP weights; null leaves the linears as they are", choices=OPTIONAL_BITS
    )
    weight_block_size: int = param(
        32, "weights (along the input dimension) sharing one exponent", choices=BFP_BLOCK_SIZES
    )
    rounding: str = param(
        "nearest_even", "mantissa rounding (nearest_away: microxcaling's MX emulation)", choices=BFP_ROUNDING
    )
    ignore: list[str] = param(["lm_head"], "linears left unquantized by weight_bits (glob, or re:REGEX)")

    def __post_init__(self):
        self.needs_calibration = self.k_bits is not None and (self.ksort.startswith("act") or self.refine == "greedy")

    def check(self) -> None:
        if self.k_bits is None and self.weight_bits is None:
            raise ValueError("k_bits: both k_bits and weight_bits are null, so the step would do nothing")
        if self.k_bits is None and self.v_bits is not None:
            raise ValueError("v_bits: values are stored in BFP only with the keys (set k_bits)")
        if self.refine == "greedy" and (self.k_bits is None or self.ksort == "none"):
            raise ValueError("refine: greedy refines a K-sort order; it needs k_bits and a ksort other than none")

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits is not None

    @property
    def declares_kv_cache(self) -> bool:
        return self.k_bits is not None

    @property
    def cache_spec(self) -> BFPCacheSpec:
        return BFPCacheSpec(
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            block_size=self.block_size,
            scope=self.scope,
            rounding=self.rounding,
            quantize_fresh=self.quantize_fresh,
            k_perm=self.ksort != "none",
        )

    def check_model(self, linears: dict) -> None:
        if self.k_bits is not None and not any(
            name.endswith(("self_attn.k_proj", "self_attn.qkv_proj")) for name in linears
        ):
            raise ValueError(
                "k_bits: the BFP KV cache needs attention with a k_proj whose keys are cached after RoPE (Llama, "
                "Mistral, Qwen2, Qwen3); this model's blocks have none"
            )

    def compress_block(self, context: BlockContext) -> None:
        if self.weight_bits is not None:
            self.quantize_weights(context)
        if self.k_bits is not None:
            self.sort_keys(context)

    def quantize_weights(self, context: BlockContext) -> None:
        for name, linear in context.linears(self.ignore).items():
            weight = linear.weight.data
            quantized = BFPWeight.quantize(weight, self.weight_bits, self.weight_block_size, self.rounding)
            context.replace_linear(name, quantized)
            error = (quantized.dequantize(torch.float32) - weight.float()).norm() / weight.float().norm().clamp(
                min=1e-30
            )
            context.record(name, error=float(error), bits_per_weight=quantized.bits_per_weight())

    def sort_keys(self, context: BlockContext) -> None:
        geometry = attention_geometry(context.config)
        spec = self.cache_spec
        spec.check_geometry(geometry.head_dim)
        if context.index == 0:
            context.declare_kv_cache(spec)
        adapter, attention = context.adapter, context.adapter.attention
        q_proj = query_projection(adapter, context.block) if self.refine == "greedy" else None
        recorder = (
            record_calibration_keys(
                context.block, context.inputs, context.block_kwargs, q_proj, geometry.num_heads * geometry.head_dim
            )
            if self.needs_calibration
            else None
        )
        if recorder is not None:
            recorder.reduce(context.run.distributed)
        if self.ksort == "none":
            perm = None
        elif self.ksort == "weight_norm":
            weight = projection_weight(adapter, context.block, "k", context.config)
            perm = ksort_permutation(weight_norm_stat(weight.detach()), geometry.head_dim, self.scope)
        else:
            perm = ksort_permutation(recorder.stat(self.ksort), geometry.head_dim, self.scope)
        numbers = {"k_bits": self.k_bits, "block_size": self.block_size, "ksort": self.ksort}
        if self.refine == "greedy":
            weights = query_weights(recorder.query_energy(), geometry.num_kv_heads, geometry.head_dim)
            perm, before, after = refine_permutation(
                torch.cat(recorder.sample),
                weights,
                perm,
                self.k_bits,
                self.block_size,
                geometry.head_dim,
                self.scope,
                self.refine_trials,
                context.index,
                self.rounding,
            )
            numbers.update(logit_error_sorted=before, logit_error_refined=after)
        if perm is not None:
            context.attach_tensor(attention, "k_perm", perm)
        if recorder is not None:
            keys = torch.cat(recorder.sample)
            unsorted = bfp_key_error(keys, self.k_bits, self.block_size, None, self.rounding)
            numbers.update(
                key_error_unsorted=unsorted["relative_mse"], key_channel_error_unsorted=unsorted["channel_mse"]
            )
            if perm is not None:
                sorted_ = bfp_key_error(keys, self.k_bits, self.block_size, perm, self.rounding)
                numbers.update(key_error=sorted_["relative_mse"], key_channel_error=sorted_["channel_mse"])
        context.record(f"{attention}.k_cache", **numbers)
