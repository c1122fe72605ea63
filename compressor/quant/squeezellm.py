"""SqueezeLLM: Fisher-weighted non-uniform quantization with dense-and-sparse outliers.

Paper: Kim et al., *SqueezeLLM: Dense-and-Sparse Quantization*, arXiv 2306.07629 (ICML 2024);
official code SqueezeAILab/SqueezeLLM and kssteven418/SqueezeLLM-gradients.

A model step. Per block linear W [N, K]: (1) the diagonal Fisher ``sum_s g_s**2``, one calibration
sequence per backward (``fisher_diagonal``), in fp32 accumulators on the CPU by default, optionally
one pass per group of blocks (``fisher_passes``, same result, less memory); (2) optionally
``sensitive_percent`` (top Fisher) and ``outlier_percent`` (top magnitude) of each matrix kept
exactly as CSR (``sparse_mask``); (3) per output row, 2**bits centroids by Fisher-weighted k-means
(``fisher_weighted_kmeans``); (4) each row's codebook scaled by ``<w, w> / <q, w>`` so its outputs are
not shrunk toward 0 (``unbiased_scale``); (5) a ``LUTWeight``, or a ``DenseAndSparseWeight``.

Defaults: 4 bits, dense-only, ``init: best`` (k-means++ and the RTN grid, the better per row),
``rescale: unbiased``, lm_head and embeddings in full precision; ``init: kmeans++, rescale: none`` is
the official method. Deviations (exact per-matrix sparse counts, the two starts, the rescale, fp32
Fisher), their reasons and the measured numbers: docs/methods/squeezellm.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.blockwise import weight_gradients
from compressor.modules.linear import QuantizedLinear
from compressor.quant.codebook import INITS, LUT_DTYPES, assign, fisher_weighted_kmeans
from compressor.step import Step, param, register_step
from compressor.weights.values import DenseAndSparseWeight, LUTWeight, SparseOutliers

if TYPE_CHECKING:
    from compressor.context import ModelContext

RESCALES = ("unbiased", "none")
FISHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def unbiased_scale(weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Per-row ``alpha = <w, w> / <q, w>`` [R, 1]: ``alpha * q`` regresses onto ``w`` with slope 1
    (``<alpha q, w> = <w, w>``). Rows where it is undefined or not positive get 1."""
    weight, quantized = weight.double(), quantized.double()
    energy = weight.square().sum(1, keepdim=True)
    overlap = (quantized * weight).sum(1, keepdim=True)
    valid = (overlap > 0) & (energy > 0)
    return torch.where(valid, energy / torch.where(valid, overlap, 1.0), 1.0).float()


# ----------------------------------------------------------------------------------------------
# Dense-and-sparse


def exact_count(numel: int, percent: float) -> int:
    return int(round(numel * percent / 100))


def sparse_mask(
    weight: torch.Tensor, fisher: torch.Tensor, sensitive_percent: float, outlier_percent: float
) -> torch.Tensor | None:
    """Entries kept in full precision: the top ``sensitive_percent`` of the matrix by Fisher value,
    then the top ``outlier_percent`` by magnitude among the others. Exactly
    ``round(numel * p / 100)`` of each (ties broken by ``topk``); None when both are 0."""
    numel = weight.numel()
    sensitive, outliers = exact_count(numel, sensitive_percent), exact_count(numel, outlier_percent)
    if sensitive + outliers == 0:
        return None
    mask = torch.zeros(numel, dtype=torch.bool, device=weight.device)
    if sensitive:
        mask[fisher.reshape(-1).float().topk(sensitive, sorted=False).indices] = True
    if outliers:
        magnitude = weight.reshape(-1).float().abs().masked_fill(mask, -1.0)
        mask[magnitude.topk(outliers, sorted=False).indices] = True
    return mask.view_as(weight)


# ----------------------------------------------------------------------------------------------
# One matrix


def quantize_squeezellm(
    weight: torch.Tensor,
    fisher: torch.Tensor,
    bits: int,
    *,
    sensitive_percent: float = 0.0,
    outlier_percent: float = 0.0,
    init: str = "best",
    iterations: int = 50,
    seed: int = 0,
    lut_dtype: torch.dtype = torch.float16,
    rescale: str = "unbiased",
) -> LUTWeight | DenseAndSparseWeight:
    """SqueezeLLM value of one weight matrix [N, K] given its Fisher diagonal (same shape)."""
    if rescale not in RESCALES:
        raise ValueError(f"rescale {rescale!r}; expected one of {RESCALES}")
    weight = weight.float()
    fisher = fisher.float().clamp(min=0)
    mask = sparse_mask(weight, fisher, sensitive_percent, outlier_percent)
    dense, fisher_dense = weight, fisher
    if mask is not None:
        dense = weight.masked_fill(mask, 0.0)
        fisher_dense = fisher.masked_fill(mask, 0.0)
        # a row with only sparse entries and zero Fisher elsewhere: unit weights on its dense entries
        empty = fisher_dense.amax(1, keepdim=True) <= 0
        fisher_dense = torch.where(empty & ~mask, torch.ones_like(fisher_dense), fisher_dense)
    centroids, codes, _ = fisher_weighted_kmeans(dense, fisher_dense, bits, iterations=iterations, init=init, seed=seed)
    if rescale == "unbiased":  # sparse positions hold 0 in ``dense``: they count in neither sum
        centroids = centroids * unbiased_scale(dense, centroids.gather(1, codes.long()))
        lut = centroids.to(lut_dtype)  # a positive scale and the rounding keep the order; the k-means codes stay
    else:
        lut = centroids.to(lut_dtype)  # rounding keeps the order; codes are chosen for the stored values
        codes = assign(dense, lut.float().contiguous())
    if mask is None:
        return LUTWeight(codes=codes.to(torch.uint8), lut=lut, bits=bits)
    nearest_zero = lut.float().abs().argmin(1, keepdim=True)
    codes = torch.where(mask, nearest_zero, codes)
    residual = weight - lut.float().gather(1, codes)
    outliers = SparseOutliers.from_dense(residual, dtype=lut_dtype, mask=mask)
    return DenseAndSparseWeight.from_parts(LUTWeight(codes=codes.to(torch.uint8), lut=lut, bits=bits), outliers)


# ----------------------------------------------------------------------------------------------
# Fisher information through the model-step API


def fisher_diagonal(
    context,
    modules: dict[str, nn.Linear],
    tokens: torch.Tensor,
    store: torch.device,
    dtype: torch.dtype = torch.float32,
    progress=None,
) -> dict[str, torch.Tensor]:
    """``sum_s grad_s(W)**2`` accumulated in ``dtype`` on ``store`` for each module's weight, one
    calibration sequence per backward (``context.forward_backward``, whose gradients arrive layer by
    layer). Each square is formed in fp32; a bf16 accumulator rounds every partial sum. ``progress``
    (a ``Progress``) counts the sequences with their loss."""
    fisher = {name: torch.zeros(module.weight.shape, dtype=dtype, device=store) for name, module in modules.items()}

    def accumulate(name, grad):
        fisher[name].add_(grad.float().square().to(store))

    with weight_gradients(modules, accumulate):
        for sample in tokens.split(1):
            loss = context.forward_backward(sample)
            if progress is not None:
                progress.update(loss=loss)
    return fisher


def block_groups(count: int, passes: int) -> list[list[int]]:
    """Block indices 0..count-1 in ``passes`` contiguous groups of near-equal size (at most one per block)."""
    return [group.tolist() for group in torch.arange(count).tensor_split(min(passes, count))]


# ----------------------------------------------------------------------------------------------
# The recipe step


@register_step("squeezellm")
@dataclass
class SqueezeLLM(Step):
    """SqueezeLLM: Fisher-weighted per-row k-means codebooks, optionally with sparse full-precision outliers."""

    quantizes_weights = True

    bits: int = param(4, "bits per weight code (2**bits centroids per output row)", choices=range(2, 9))
    sensitive_percent: float = param(
        0.0, "percent of each matrix kept exactly: the highest Fisher values (paper: 0.05)", min=0.0, max=100.0
    )
    outlier_percent: float = param(
        0.0, "percent of each matrix kept exactly: the largest magnitudes (paper: 0.40)", min=0.0, max=100.0
    )
    init: str = param(
        "best", "k-means start: kmeans++ (official), uniform (RTN grid) or best of both per row", choices=INITS
    )
    iterations: int = param(50, "most Lloyd iterations per row (official: 50)", min=1)
    seed: int = param(0, "seed of the k-means++ draws")
    rescale: str = param(
        "unbiased",
        "per-row codebook scale after k-means: unbiased (<q,w> = <w,w>) or none (official)",
        choices=RESCALES,
    )
    lut_dtype: str = param("float16", "dtype of the stored codebooks and sparse values", choices=tuple(LUT_DTYPES))
    fisher_device: str = param(
        "cpu", "where the Fisher accumulators live: cpu (any model size) or device", choices=("cpu", "device")
    )
    fisher_dtype: str = param(
        "float32",
        "Fisher accumulators: float32, or bfloat16 (the official hook code; half the memory)",
        choices=tuple(FISHER_DTYPES),
    )
    fisher_passes: int = param(
        1,
        "blocks split into this many groups, one Fisher pass each: the same Fisher, accumulator memory / passes, "
        "about (passes + 1) / 2 times the backward work",
        min=1,
    )
    ignore: list[str] = param(["lm_head"], "module names or patterns left unquantized (glob, or re:REGEX)")

    kind = "model"
    distributes = "sums"  # Fisher diagonals summed over every rank's samples; each layer's k-means on its owner

    def check(self) -> None:
        if self.sensitive_percent + self.outlier_percent > 100:
            raise ValueError(
                "outlier_percent: sensitive_percent + outlier_percent = "
                f"{self.sensitive_percent + self.outlier_percent} exceeds 100"
            )

    def compress_model(self, context: ModelContext) -> None:
        targets = {
            (index, name): linear
            for index in range(context.num_blocks)
            for name, linear in context.linears(self.ignore, index).items()
        }
        tokens = context.calibration_tokens()
        groups = block_groups(context.num_blocks, self.fisher_passes)
        self.check_fisher_memory(context, targets, groups)
        finished = {}  # name -> module from earlier passes: swapped in once no Fisher pass needs the fp weights
        for number, group in enumerate(groups, start=1):
            group_targets = {(index, name): linear for (index, name), linear in targets.items() if index in group}
            fisher = self.fisher_pass(
                context, {name: linear for (_, name), linear in group_targets.items()}, tokens, group
            )
            where = {name: (index, linear) for (index, name), linear in group_targets.items()}
            with context.progress(len(group_targets), "k-means", "layer") as progress:
                # several processes: each layer's Fisher sum meets at its owner, which runs the k-means
                solved = context.run.distributed.solve_owned(
                    {name: [fisher[name]] for name in where},
                    {name: linear.weight.numel() * 2**self.bits for name, (_, linear) in where.items()},
                    lambda name: self.quantize_layer(context, where[name][0], name, where[name][1], fisher.pop(name)),
                    context.run.report,
                )
                for name, (_, linear) in where.items():
                    home = linear.weight.device
                    quantized = solved.pop(name)
                    if number == len(groups):
                        context.replace_linear(name, quantized)
                    else:
                        finished[name] = QuantizedLinear(quantized, linear.bias).to(home)
                    progress.update()
        for name, module in finished.items():
            context.replace_module(name, module)

    def accumulator_device(self, context: ModelContext) -> torch.device:
        return torch.device("cpu") if self.fisher_device == "cpu" else torch.device(context.device)

    def check_fisher_memory(self, context: ModelContext, targets: dict, groups: list[list[int]]) -> None:
        """Fail before the first pass, naming the setting to change, when one pass's accumulators
        would not fit in 90 % of the free memory where they live."""
        from compressor.report import free_memory

        store = self.accumulator_device(context)
        element = torch.tensor([], dtype=FISHER_DTYPES[self.fisher_dtype]).element_size()
        per_block = [0] * sum(len(group) for group in groups)
        for (index, _), linear in targets.items():
            per_block[index] += linear.weight.numel() * element

        def largest_pass(split):
            return max(sum(per_block[i] for i in group) for group in split)

        needed, free = largest_pass(groups), free_memory(store)
        if free is None or needed <= 0.9 * free:
            return
        passes = next(
            (p for p in range(1, len(per_block) + 1) if largest_pass(block_groups(len(per_block), p)) <= 0.9 * free),
            None,
        )
        advice = (
            f"set fisher_passes: {passes}"
            if passes
            else "no split fits: use fisher_dtype: bfloat16 or the other fisher_device"
        )
        raise ValueError(
            f"squeezellm: fisher_passes: one Fisher pass needs {needed / 2**30:.2f} GiB of {self.fisher_dtype} "
            f"accumulators on {store}, {free / 2**30:.2f} GiB is free; {advice}"
        )

    def fisher_pass(
        self, context: ModelContext, modules: dict[str, nn.Linear], tokens: torch.Tensor, group: list[int]
    ) -> dict[str, torch.Tensor]:
        """The Fisher of ``modules`` (one group of blocks), recorded with its time and peak memory."""
        from compressor.report import peak_memory

        store = self.accumulator_device(context)
        if context.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(context.device)
        started = time.perf_counter()
        with context.progress(len(tokens), f"Fisher of blocks {group[0]}..{group[-1]}", "sample") as progress:
            fisher = fisher_diagonal(context, modules, tokens, store, FISHER_DTYPES[self.fisher_dtype], progress)
        context.record(
            "fisher",
            samples=tokens.shape[0],
            seq_len=tokens.shape[1],
            seconds=round(time.perf_counter() - started, 3),
            accumulators=f"{self.fisher_device} {self.fisher_dtype}",
            blocks=f"{group[0]}..{group[-1]}",
            **{k: round(v, 3) for k, v in peak_memory(context.device).items()},
        )
        return fisher

    def quantize_layer(
        self, context: ModelContext, block: int, name: str, linear: nn.Linear, fisher: torch.Tensor
    ) -> LUTWeight | DenseAndSparseWeight:
        """One layer's SqueezeLLM value on ``context.device``, recorded with its error and k-means time."""
        weight = linear.weight.data.to(context.device)
        started = time.perf_counter()
        quantized = quantize_squeezellm(
            weight,
            fisher.to(context.device),
            self.bits,
            sensitive_percent=self.sensitive_percent,
            outlier_percent=self.outlier_percent,
            init=self.init,
            iterations=self.iterations,
            seed=self.seed,
            lut_dtype=LUT_DTYPES[self.lut_dtype],
            rescale=self.rescale,
        )
        seconds = time.perf_counter() - started
        error = float(
            (weight.float() - quantized.dequantize(torch.float32)).norm() / weight.float().norm().clamp(min=1e-30)
        )
        numbers = dict(error=error, bits_per_weight=quantized.bits_per_weight(), kmeans_seconds=round(seconds, 4))
        if isinstance(quantized, DenseAndSparseWeight):
            numbers["sparse_fraction"] = quantized.outlier_col.numel() / weight.numel()
        context.record(name, block=block, **numbers)
        return quantized
