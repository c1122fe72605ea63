"""AWQ: activation-aware per-channel weight scaling and range clipping, before a uniform quantizer.

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024,
arXiv 2306.00978; official code mit-han-lab/llm-awq (``awq/quantize/auto_scale.py``, ``auto_clip.py``).
Per decoder block, at every point where a per-channel scale folds exactly into the operation before the
linears (the adapter's ``norm_linear_groups`` and ``linear_channel_links``: input norm -> q, k, v;
v -> o; post-attention norm -> gate, up; up -> down), the scale is ``s = mean|x|^alpha`` over the linears'
input channels, normalised so that ``sqrt(max s * min s) = 1``, with alpha on the grid ``0, 1/alphas, ..,
(alphas-1)/alphas``. Each candidate rounds ``W diag(s)`` on the grid of the quantizer that follows (``bits``,
``group_size``, ``symmetric``: set them as that step's) and divides by s again; the alpha kept minimises
the mean squared output error of the inspected module (the attention for q/k/v, whose output is o's; the
MLP for gate/up; the linear itself otherwise) on the block's calibration inputs. alpha = 0 (no scaling)
is on the grid, so the search never does worse than plain rounding there. The scale is then folded: the
norm's gain and bias (or the previous linear's rows and bias) divided by s, the linears' columns
multiplied by s, so the block in full precision computes the same function. Then (``clip``) every linear
but q and k (their error passes through the softmax; the official code skips them too) gets per-group
ranges shrunk by the factor of ``1, 0.95, .., 0.55`` that minimises the group's output error on 512
tokens sampled evenly from the calibration inputs (every ``tokens // 512``-th of them all, in order), and its
weights are clamped to that range. On several processes every rank runs the block on its share of the samples:
mean |x| and each alpha's error are all-reduced sums, and the 512 tokens meet at each linear's owner, so the
choices are the single process's (up to the order of float sums).

The step only changes fp weights and norms: the quantizer after it in the recipe (``rtn``, ``gptq``,
``efficientqat_block_ap``, ...) does the rounding, and rounds clamped weights onto exactly the ranges
the clip search chose. Defaults are the official code's (20 alphas; clip grid 20 down to half the
range; 512 tokens; 4 bits g128). Choices where the official code differs: under grouped-query
attention the v -> o scale is tied over the query heads sharing a KV head (their statistics averaged),
where llm-awq scales v -> o only when the two shapes match; clipping shrinks both ends of an
asymmetric range by the factor (``minmax_params``' ``clip``, ranges including 0), where llm-awq clamps
to +-max and lets the asymmetric grid follow; candidates round with scales stored at the checkpoint's
scale dtype, as the export will. AutoAWQ's ``duo_scaling`` (dividing by mean|w|^(1-alpha)) is not the
paper's and is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.arch import attention_geometry, linear_channel_links, norm_linear_groups
from compressor.blockwise import InputHooks, first_output
from compressor.distributed import RowSample
from compressor.quant.uniform import check_group_size, grouped, minmax_params, quantize_codes
from compressor.step import Step, param, register_step
from compressor.weights.values import UniformWeight

if TYPE_CHECKING:
    from compressor.context import BlockContext

CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512  # llm-awq's auto_clip_layer
CLIP_ROWS = 64  # output rows searched at once (memory only)


# ----------------------------------------------------------------------------------------------
# The math on tensors


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^alpha`` per channel, normalised so that sqrt(max * min) = 1 (llm-awq's)."""
    scale = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return scale / (scale.max() * scale.min()).sqrt()


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    clip: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``weight`` rounded to nearest on its min-max group grid (ranges times ``clip``), dequantized (fp32)."""
    scales, zeros = minmax_params(weight, bits, group_size, symmetric, scale_dtype, clip)
    codes = quantize_codes(weight, scales, zeros, bits, group_size)
    return UniformWeight(codes, scales, zeros, bits, group_size).dequantize(torch.float32)


def clamp_to_clipped_range(weight: torch.Tensor, clip: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """``weight`` [N, K] clamped per group to the range ``minmax_params`` gives with ``clip`` [N, G]: rounding
    the result with ``clip = 1`` is rounding ``weight`` with ``clip``."""
    n, k = weight.shape
    groups = grouped(weight.float(), group_size)
    if symmetric:
        high = groups.abs().amax(dim=-1) * clip
        low = -high
    else:
        low = groups.amin(dim=-1).clamp(max=0) * clip
        high = groups.amax(dim=-1).clamp(min=0) * clip
    clamped = torch.maximum(torch.minimum(groups, high.unsqueeze(-1)), low.unsqueeze(-1))
    return clamped.reshape(n, -1)[:, :k]


def search_clip(
    weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Per group of ``weight`` [N, K], the range factor in ``1, 0.95, .., 0.55`` whose rounding minimises
    the group's mean squared contribution error ``(x_g . (q_g - w_g))^2`` over the tokens ``x`` [T, K]."""
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    features = x.float().reshape(-1, k // size, size)  # [T, G, size]
    best = torch.ones(n, k // size, device=weight.device)
    for start in range(0, n, CLIP_ROWS):
        w = weight[start : start + CLIP_ROWS].float()
        reference = torch.einsum("tgc,ngc->ntg", features, w.reshape(len(w), -1, size))
        lowest = torch.full((len(w), k // size), float("inf"), device=weight.device)
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            factor = 1 - step / CLIP_GRID
            q = fake_quantize(w, bits, group_size, symmetric, scale_dtype, factor)
            output = torch.einsum("tgc,ngc->ntg", features, q.reshape(len(w), -1, size))
            error = (output - reference).square().mean(dim=1)
            better = error < lowest
            lowest[better] = error[better]
            best[start : start + len(w)][better] = factor
    return best


# ----------------------------------------------------------------------------------------------
# Where scales fold in a block


@dataclass(frozen=True)
class ScalePoint:
    """A per-channel scale of ``linears``' inputs that folds into ``before`` (a norm or a linear), searched on
    the output of ``inspect``. ``heads`` = (KV heads, query heads per KV head, head dim) when ``before`` is
    v_proj under grouped-query attention: the linears' input channels repeat the scaled ones per query head."""

    before: str
    linears: tuple[str, ...]
    inspect: str
    heads: tuple[int, int, int] | None = None

    def consumer_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale of the linears' input channels, from that of ``before``'s output channels."""
        if self.heads is None:
            return scale
        kv, repeats, dim = self.heads
        return scale.view(kv, 1, dim).expand(kv, repeats, dim).reshape(-1)

    def before_statistic(self, mean_abs: torch.Tensor) -> torch.Tensor:
        """mean|x| of the linears' input channels, per scaled channel (averaged over the query heads of a group)."""
        if self.heads is None:
            return mean_abs
        kv, repeats, dim = self.heads
        return mean_abs.view(kv, repeats, dim).mean(dim=1).reshape(-1)


def common_module(paths: tuple[str, ...]) -> str:
    """The innermost module holding all of ``paths`` (a single linear: itself)."""
    if len(paths) == 1:
        return paths[0]
    parts = [path.split(".") for path in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def scale_points(adapter, config) -> list[ScalePoint]:
    """The block's scale points in block order: each norm -> its readers, each linked linear pair."""
    points = [
        ScalePoint(norm, linears, common_module(linears)) for norm, linears in norm_linear_groups(adapter).items()
    ]
    geometry = attention_geometry(config)
    for first, second in linear_channel_links(adapter).items():
        heads = None
        if first == adapter.linears["v"] and geometry.num_heads != geometry.num_kv_heads:
            repeats = geometry.num_heads // geometry.num_kv_heads
            heads = (geometry.num_kv_heads, repeats, geometry.head_dim)
        points.append(ScalePoint(first, (second,), second, heads))
    order = list(adapter.linears.values())
    return sorted(points, key=lambda point: order.index(point.linears[0]))


def check_foldable(block: nn.Module, point: ScalePoint, where: str) -> None:
    """One line when ``point``'s scale cannot be folded exactly in this block."""
    modules = dict(block.named_modules())
    for name in point.linears:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "has no such module" if module is None else f"holds a {type(module).__name__}, not a dense linear"
            raise ValueError(
                f"{where}.{name} {what}: AWQ folds its scales into dense weights, so it comes before every quantizer "
                "and architecture change"
            )
    before = modules.get(point.before)
    inputs = block.get_submodule(point.linears[0]).in_features
    if isinstance(before, nn.Linear):
        width = before.out_features * (1 if point.heads is None else point.heads[1])
        if width != inputs:
            raise ValueError(
                f"{where}.{point.before} has {before.out_features} outputs for {inputs} inputs of its reader"
            )
        return
    gain = getattr(before, "weight", None)
    if not isinstance(gain, torch.Tensor) or gain.shape != (inputs,):
        raise ValueError(
            f"{where}.{point.before} ({type(before).__name__}) has no per-channel gain of size {inputs} to fold "
            "AWQ's scales into; this model family cannot take the awq step"
        )


@torch.no_grad()
def fold_scale(block: nn.Module, point: ScalePoint, scale: torch.Tensor) -> None:
    """Divide ``before``'s outputs by ``scale`` (a norm's gain and bias, a linear's rows and bias) and multiply
    the linears' input columns by it: the block's function is unchanged (up to float rounding)."""
    before = block.get_submodule(point.before)
    if isinstance(before, nn.Linear):
        before.weight.div_(scale.to(before.weight.dtype)[:, None])
    else:
        before.weight.div_(scale.to(before.weight.dtype))
    if getattr(before, "bias", None) is not None:
        before.bias.div_(scale.to(before.bias.dtype))
    columns = point.consumer_scale(scale)
    for name in point.linears:
        linear = block.get_submodule(name)
        linear.weight.mul_(columns.to(linear.weight.dtype))


# ----------------------------------------------------------------------------------------------
# Catching what the search replays


class PointRecorder:
    """While the block runs: every call of each point's inspected module (to replay it) and the mean |x| of
    its linears' input channels."""

    def __init__(self, block: nn.Module, points: list[ScalePoint]):
        self.block, self.points = block, points
        self.calls: dict[str, list] = {point.inspect: [] for point in points}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.hooks = []

    def __enter__(self):
        for path in self.calls:
            self.hooks.append(
                self.block.get_submodule(path).register_forward_pre_hook(self.call_catcher(path), with_kwargs=True)
            )
        for point in self.points:
            first = point.linears[0]
            self.hooks.append(self.block.get_submodule(first).register_forward_pre_hook(self.input_catcher(first)))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def call_catcher(self, path: str):
        def catch(module, args, kwargs):
            self.calls[path].append((args, kwargs))

        return catch

    def input_catcher(self, path: str):
        def catch(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if path not in self.sums:
                self.sums[path] = torch.zeros(x.shape[-1], device=x.device)
                self.tokens[path] = 0
            self.sums[path] += x.abs().sum(dim=0)
            self.tokens[path] += x.shape[0]

        return catch

    def reduce(self, distributed) -> None:
        """Every rank's sums and token counts added (several processes): the means are over all the tokens."""
        for path in dict.fromkeys(point.linears[0] for point in self.points):
            distributed.all_reduce_sum(self.sums[path])
            self.tokens[path] = int(distributed.all_reduce_sum(torch.tensor([self.tokens[path]], dtype=torch.float64)))

    def mean_abs(self, point: ScalePoint) -> torch.Tensor:
        first = point.linears[0]
        return point.before_statistic(self.sums[first] / self.tokens[first])

    def replay(self, point: ScalePoint) -> list[torch.Tensor]:
        module = self.block.get_submodule(point.inspect)
        return [first_output(module(*args, **kwargs)).float() for args, kwargs in self.calls[point.inspect]]


class InputSampler(InputHooks):
    """While the block runs: tokens ``0, every, 2 every, ..`` (at most ``CLIP_TOKENS``) of each named linear's input
    over all the calibration tokens, as ``distributed.RowSample``s (this rank's positions filled: summed over ranks,
    the single process's sample)."""

    def __init__(self, block: nn.Module, names: list[str], make_sample):
        super().__init__(block, names)
        self.samples = {name: make_sample() for name in names}

    def catch(self, name: str, x: torch.Tensor) -> None:
        self.samples[name].add(x.reshape(-1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# The step


@register_step("awq")
@dataclass
class AWQ(Step):
    """AWQ: activation-aware per-channel scales folded into norms and linears, and clipped ranges (Lin et al. 2023);
    a quantizer comes after it."""

    # the families whose norms are plain per-channel gains and whose v_proj / up_proj feed o_proj / down_proj
    # channel for channel (tested on each); Gemma's (1 + w) norms, fused and MoE projections are not folded yet
    families = ("llama", "mistral", "qwen2", "qwen3")
    # several processes: mean |x| and each alpha's output error are sums over tokens, all-reduced (every rank keeps
    # the same alpha); each linear's clip-search tokens are summed to its owner, which searches (distributed.py)
    distributes = "sums"

    bits: int = param(4, "bits of the quantizer that follows (the search rounds on its grid)", choices=range(2, 9))
    group_size: int = param(128, "group size of the quantizer that follows; -1 for one per output row")
    symmetric: bool = param(True, "whether the quantizer that follows is symmetric")
    alphas: int = param(20, "exponents tried: 0, 1/alphas, .., (alphas-1)/alphas", min=1)
    clip: bool = param(True, "search and clamp each group's range (every linear but q and k)")
    ignore: list[str] = param(["lm_head"], "linears the quantizer after leaves alone: scaled, never rounded or clipped")

    def check(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} is not -1 or a positive integer")

    def check_config(self, config) -> None:
        geometry = attention_geometry(config)
        if geometry.num_heads % geometry.num_kv_heads:
            raise ValueError(
                f"{geometry.num_heads} query heads do not share {geometry.num_kv_heads} KV heads evenly, so the "
                "v_proj -> o_proj scale cannot be folded"
            )

    def check_model(self, linears: dict) -> None:
        for name, linear in linears.items():
            check_group_size(name, linear.in_features, self.group_size)

    def compress_block(self, context: BlockContext) -> None:
        block = context.block
        points = scale_points(context.adapter, context.config)
        for point in points:
            check_foldable(block, point, context.prefix)
        rounded = context.linears(self.ignore)  # the linears the quantizer after will round
        with torch.no_grad(), PointRecorder(block, points) as recorder:
            context.forward()
        recorder.reduce(context.run.distributed)
        for point in points:
            self.search_and_fold(context, recorder, point, [name for name in point.linears if name in rounded])
        del recorder
        if self.clip:
            self.clip_ranges(context, [name for name in rounded if name not in self.unclipped(context.adapter)])

    def search_and_fold(self, context: BlockContext, recorder: PointRecorder, point: ScalePoint, names: list[str]):
        if not names:
            return
        block = context.block
        linears = {name: block.get_submodule(name) for name in names}
        originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
        statistic = recorder.mean_abs(point)
        with torch.no_grad():
            reference = recorder.replay(point)
            errors = []  # per alpha: squared error summed over this rank's tokens
            for step in range(self.alphas):
                columns = point.consumer_scale(awq_scale(statistic, step / self.alphas))
                for name, linear in linears.items():
                    scaled = originals[name].float() * columns
                    quantized = fake_quantize(scaled, self.bits, self.group_size, self.symmetric, context.scale_dtype)
                    linear.weight.copy_(quantized / columns)
                errors.append(squared_error(recorder.replay(point), reference))
            for name, linear in linears.items():
                linear.weight.copy_(originals[name])
        # several processes: the sums over every rank's tokens, so every rank keeps the same alpha
        errors.append(sum(target.numel() for target in reference))
        errors = context.run.distributed.all_reduce_sum(torch.tensor(errors, dtype=torch.float64)).tolist()
        losses = [error / errors[-1] for error in errors[:-1]]
        best = min(range(self.alphas), key=losses.__getitem__)
        fold_scale(block, point, awq_scale(statistic, best / self.alphas))
        context.record(point.before, alpha=best / self.alphas, mse_unscaled=losses[0], mse_scaled=losses[best])

    @staticmethod
    def unclipped(adapter) -> set[str]:
        return {adapter.linears[role] for role in ("q", "k") if role in adapter.linears}

    def clip_ranges(self, context: BlockContext, names: list[str]) -> None:
        if not names:
            return
        distributed = context.run.distributed
        total, first = distributed.rows_of_everyone(sum(x.shape[:-1].numel() for x in context.inputs))
        every = max(1, total // CLIP_TOKENS)
        size = min(CLIP_TOKENS, -(-total // every))
        with torch.no_grad(), InputSampler(context.block, names, lambda: RowSample(first, every, size)) as sampler:
            context.forward()

        def search(name: str) -> torch.Tensor:
            weight = context.block.get_submodule(name).weight.detach()
            clip = search_clip(
                weight, sampler.samples[name].rows, self.bits, self.group_size, self.symmetric, context.scale_dtype
            )
            context.record(name, mean_clip=float(clip.mean()), clipped_groups=float((clip < 1).float().mean()))
            return clip

        @torch.no_grad()
        def clamp(name: str, clip: torch.Tensor) -> None:
            weight = context.block.get_submodule(name).weight
            weight.copy_(clamp_to_clipped_range(weight.detach(), clip, self.group_size, self.symmetric))

        # several processes: each linear's token sample is summed to its owner (each rank filled its own tokens'
        # rows), which searches the ranges; every rank clamps with them
        distributed.solve_owned(
            {name: [sampler.samples[name].rows] for name in names},
            {name: context.block.get_submodule(name).weight.numel() for name in names},
            search,
            context.run.report,
            context.prefix,
            context.device,
            install=clamp,
        )


def squared_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return sum(float((output - target).square().sum()) for output, target in zip(outputs, reference))
