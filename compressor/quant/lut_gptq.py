"""LUT-GPTQ: per-row non-uniform codebooks (SqueezeLLM's ``LUTWeight``) assigned with GPTQ's error feedback.

Papers: van Baalen et al., "GPTVQ: The Blessing of Dimensionality for LLM Quantization", arXiv 2402.15319
(codebooks fitted to the Hessian, then GPTQ's column sweep with nearest-codebook rounding, then a codebook
update); Kim et al., SqueezeLLM, arXiv 2306.07629 (per-row 1-D codebooks, weighted k-means). GPTVQ's
1-D case with one codebook per output row is this step. Per linear W [N, K] with Hessian H (taken
true-sequentially inside a block, exactly as ``gptq``, whose Hessian catcher, damping, column order and
column sweep it reuses, ``quant/gptq.py``):

1. codebook: per row, 2**bits centroids by weighted k-means (``codebook.fisher_weighted_kmeans``, best of
   k-means++ and the uniform grid) with column weights ``1 / [U]_qq^2`` (U the upper Cholesky factor of
   H^-1 in the solve order): the weight GPTQ's own loss puts on each column's rounding error (GPTVQ weights
   its k-means the same way);
2. assignment: GPTQ's sweep (``gptq.column_sweep``), each column rounded to its rows' nearest centroid and
   the error spread over the later columns through U;
3. codebook update: with the codes fixed, each row's centroids solve the least-squares problem
   ``min_c (w - A c)^T H (w - A c)`` (A the row's one-hot code matrix; ``gptq.refit_rows``), which
   minimises the layer's output error for those codes exactly (GPTVQ takes gradient steps on the same
   loss); 2-3 repeat ``rounds`` times (the next sweep starts from the updated codebook; the round with
   the lowest error is kept).

The codebooks are stored in fp16 (``LUTWeight``: ``bits + 16 * 2**bits / K`` bits per weight, counted in
the report) and the sweep rounds onto the stored fp16 values. Defaults: 3 bits, 2 rounds, GPTQ's damping
0.01, block 128, static activation order (the order only matters for the sweep; codes are stored per
column as usual). Exported in our native format (LUT weights), loaded by our loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.quant.codebook import LUT_DTYPES, assign, fisher_weighted_kmeans
from compressor.quant.gptq import (
    ACTORDERS,
    column_sweep,
    inverse_cholesky,
    output_error,
    prepare,
    refit_rows,
    sequential_hessians,
    solve_cost,
    solve_order,
    weighted_output_error,
)
from compressor.step import Step, param, register_step
from compressor.weights.values import LUTWeight

if TYPE_CHECKING:
    from compressor.context import BlockContext


def nearest_sweep(
    w: torch.Tensor, hinv: torch.Tensor, centroids: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, float]:
    """GPTQ's sweep of ``w`` [N, K] (solve order) onto each row's sorted ``centroids`` [N, m]: codes [N, K]
    (int64) and the sweep's loss."""
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)

    def quantize(column: int, upcoming) -> torch.Tensor:
        codes[:, column] = assign(upcoming(column + 1), centroids)[:, 0]
        return centroids.gather(1, codes[:, column : column + 1])[:, 0]

    return codes, column_sweep(w.clone(), hinv, block_size, quantize)


@dataclass
class LUTGPTQResult:
    weight: LUTWeight
    damping: float
    errors: list[float]  # tr(D H D^T) after each sweep and after each codebook update, in order


def lut_gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    rounds: int = 2,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: str = "static",
    lut_dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> LUTGPTQResult:
    """LUT-GPTQ of ``weight`` [N, K] with Hessian ``h`` [K, K]: a ``LUTWeight`` of ``2**bits`` centroids a row."""
    w, h = prepare(weight, h)
    order, w, h = solve_order(w, h, actorder)
    hinv, damping = inverse_cholesky(h, dampening_frac)
    importance = (1 / torch.diagonal(hinv).square()).expand_as(w)
    centroids, _, _ = fisher_weighted_kmeans(w, importance, bits, seed=seed)
    errors, best = [], None
    for _ in range(rounds):
        centroids = centroids.to(lut_dtype).float().sort(1).values
        codes, _ = nearest_sweep(w, hinv, centroids, block_size)
        errors.append(weighted_output_error(w, centroids.gather(1, codes), h))
        centroids = refit_rows(w, h, codes, torch.ones_like(w), centroids).to(lut_dtype).float()
        errors.append(weighted_output_error(w, centroids.gather(1, codes), h))
        if best is None or errors[-1] < best[0]:  # a later sweep may land higher: the best round is kept
            best = (errors[-1], codes, centroids)
    _, codes, centroids = best
    codes = codes[:, torch.argsort(order)].to(torch.uint8)
    return LUTGPTQResult(LUTWeight(codes, centroids.to(lut_dtype), bits), damping, errors)


@register_step("lut-gptq")
@dataclass
class LUTGPTQ(Step):
    """LUT-GPTQ (GPTVQ, 1-D): per-row non-uniform codebooks, columns assigned with GPTQ's error feedback."""

    quantizes_weights = True
    distributes = "sums"  # as gptq: Hessian sums meet at each linear's owner, which solves

    bits: int = param(3, "bits per weight code (2**bits centroids per output row)", choices=(2, 3, 4))
    rounds: int = param(2, "sweep + codebook least-squares rounds (each sweep starts from the last codebook)", min=1)
    block_size: int = param(128, "columns per lazy batch update of the sweep (speed only)", min=1)
    dampening_frac: float = param(0.01, "added to the Hessian's diagonal, as a fraction of its mean", min=0.0, max=1.0)
    actorder: str = param("static", "sweep order (static: by decreasing Hessian diagonal)", choices=ACTORDERS)
    true_sequential: bool = param(True, "take each group's Hessian with the earlier groups of the block quantized")
    lut_dtype: str = param("float16", "dtype of the stored codebooks", choices=tuple(LUT_DTYPES))
    seed: int = param(0, "seed of the k-means++ draws")
    ignore: list[str] = param(["lm_head"], "module names or patterns left unquantized (glob, or re:REGEX)")

    def compress_block(self, context: BlockContext) -> None:
        linears = context.linears(self.ignore)
        for names, catcher in sequential_hessians(context, linears, self.true_sequential):
            context.run.distributed.solve_owned(
                {name: catcher.statistics(name, linears[name]) for name in names},
                {name: solve_cost(linears[name]) for name in names},
                lambda name: self.quantize_linear(context, name, linears[name], catcher.hessian(name)),
                context.run.report,
                context.prefix,
                context.device,
                install=context.replace_linear,
            )

    def quantize_linear(self, context: BlockContext, name: str, linear: nn.Linear, h: torch.Tensor | None) -> LUTWeight:
        weight = linear.weight.data
        if h is None:  # never called on the calibration data: H = I (plain k-means on the weights)
            context.run.report.warn(f"lut-gptq: {context.prefix}.{name} saw no calibration token; H = I")
            h = torch.eye(weight.shape[1], device=weight.device)
        result = lut_gptq_quantize(
            weight,
            h,
            self.bits,
            self.rounds,
            self.block_size,
            self.dampening_frac,
            self.actorder,
            LUT_DTYPES[self.lut_dtype],
            self.seed,
        )
        context.record(
            name,
            output_error=output_error(weight, result.weight.dequantize(torch.float32), h),
            damping=result.damping,
            bits_per_weight=result.weight.bits_per_weight(),
        )
        return result.weight
