"""Weighted 1-D codebooks: per-row k-means with importance weights, all rows at once.

Shared by the methods that store a lookup table per output row (SqueezeLLM's Fisher-weighted codebooks,
LUT-GPTQ's starting codebooks); the grid itself is ``weights.values.LUTWeight``.
"""

from __future__ import annotations

import math

import torch

from compressor.quant.uniform import minmax_params
from compressor.weights.values import row_chunks

INITS = ("best", "kmeans++", "uniform")
LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def assign(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each weight; ``centroids`` [R, k] sorted ascending per row."""
    middles = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(middles, weight.contiguous())


def weighted_error(
    weight: torch.Tensor, fisher: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Per-row objective ``sum_j F_j (w_j - c[code_j])**2`` in float64."""
    error = (weight.double() - centroids.double().gather(1, codes)).square()
    return (fisher.double() * error).sum(1)


def uniform_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2**bits levels ``(j - z) * s`` of per-row asymmetric min-max RTN (``quant/uniform.py``)."""
    scale, zero = minmax_params(weight, bits, -1, symmetric=False, scale_dtype=torch.float32)
    levels = torch.arange(2**bits, device=weight.device, dtype=torch.float32)
    return (levels - zero.float()) * scale.float()


def kmeans_plusplus(weight: torch.Tensor, fisher: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy weighted k-means++ seeding per row (as sklearn's ``_kmeans_plusplus`` with sample
    weights): the first centre drawn with probability ~ F, each next one the best of
    ``2 + ln k`` candidates drawn with probability ~ F * D**2."""
    rows, columns = weight.shape
    trials = 2 + int(math.log(k))
    first = torch.multinomial(fisher, 1, generator=generator)
    centres = [weight.gather(1, first)]
    distance = (weight - centres[0]).square()
    for _ in range(1, k):
        potential = fisher * distance
        potential = torch.where(potential.sum(1, keepdim=True) > 0, potential, fisher)  # every point sits on a centre
        candidates = weight.gather(1, torch.multinomial(potential, trials, replacement=True, generator=generator))
        candidate_distance = torch.minimum(distance[:, None, :], (weight[:, None, :] - candidates[:, :, None]).square())
        best = (fisher[:, None, :] * candidate_distance).sum(-1).argmin(1, keepdim=True)
        centres.append(candidates.gather(1, best))
        distance = candidate_distance.gather(1, best[:, :, None].expand(-1, 1, columns)).squeeze(1)
    return torch.cat(centres, dim=1)


def lloyd(
    weight: torch.Tensor, fisher: torch.Tensor, centroids: torch.Tensor, iterations: int, history: list | None = None
):
    """Weighted Lloyd iterations from ``centroids``; stops when no assignment changes.

    Returns sorted centroids [R, k] and codes [R, K] (int64). An empty cluster (or one whose
    members all weigh 0) keeps its centroid. ``history`` (optional) receives the objective after
    every assignment: it never increases."""
    rows, k = centroids.shape
    centroids = centroids.sort(1).values
    codes = assign(weight, centroids)
    fisher64 = fisher.double().reshape(-1)
    moments = fisher64 * weight.double().reshape(-1)
    offsets = torch.arange(rows, device=weight.device)[:, None] * k
    for _ in range(iterations):
        if history is not None:
            history.append(weighted_error(weight, fisher, centroids, codes))
        # per-cluster sums in float64 (index_add_ over (row, code) is much faster than a float64 scatter_add_ on CPUs)
        index = (codes + offsets).reshape(-1)
        mass = (
            torch.zeros(rows * k, dtype=torch.float64, device=weight.device)
            .index_add_(0, index, fisher64)
            .view(rows, k)
        )
        moment = (
            torch.zeros(rows * k, dtype=torch.float64, device=weight.device).index_add_(0, index, moments).view(rows, k)
        )
        updated = torch.where(mass > 0, moment / mass.clamp(min=1e-300), centroids.double()).float()
        centroids = updated.sort(1).values
        new_codes = assign(weight, centroids)
        converged = torch.equal(new_codes, codes)
        codes = new_codes
        if converged:
            break
    if history is not None:
        history.append(weighted_error(weight, fisher, centroids, codes))
    return centroids, codes


def normalized_fisher(fisher: torch.Tensor) -> torch.Tensor:
    """Rows scaled to max 1 (k-means is invariant to it; keeps F * D**2 in range); all-zero rows -> 1."""
    fisher = fisher.float().clamp(min=0)
    peak = fisher.amax(1, keepdim=True)
    return torch.where(peak > 0, fisher / peak.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(fisher))


def fisher_weighted_kmeans(
    weight: torch.Tensor,
    fisher: torch.Tensor,
    bits: int,
    *,
    iterations: int = 50,
    init: str = "best",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row Fisher-weighted k-means with 2**bits centroids.

    ``weight`` and ``fisher`` are [R, K] (fisher >= 0; rows whose weights are all 0 use unit
    weights). Returns fp32 centroids [R, 2**bits] sorted per row, uint8 codes [R, K] and the fp64
    objective per row. Rows are processed in chunks of ~4M weights (``formats.row_chunks``); the
    result is deterministic for a given seed and device.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r}; expected one of {INITS}")
    k = 2**bits
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    all_centroids, all_codes, all_errors = [], [], []
    for rows in row_chunks(*weight.shape):
        w = weight[rows].float()
        f = normalized_fisher(fisher[rows])
        results = []
        if init in ("best", "kmeans++"):
            results.append(lloyd(w, f, kmeans_plusplus(w, f, k, generator), iterations))
        if init in ("best", "uniform"):
            results.append(lloyd(w, f, uniform_grid(w, bits), iterations))
        errors = [weighted_error(w, f, c, codes) for c, codes in results]
        centroids, codes = results[0]
        error = errors[0]
        if len(results) == 2:
            better = errors[1] < errors[0]
            centroids = torch.where(better[:, None], results[1][0], centroids)
            codes = torch.where(better[:, None], results[1][1], codes)
            error = torch.minimum(errors[0], errors[1])
        all_centroids.append(centroids)
        all_codes.append(codes.to(torch.uint8))
        all_errors.append(error)
    return torch.cat(all_centroids), torch.cat(all_codes), torch.cat(all_errors)
