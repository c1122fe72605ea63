"""Truncated SVD of every block projection at a parameter budget: the plain low-rank baseline.

Each weight ``W [out, in]`` becomes its best rank-``r`` approximation in the Frobenius norm
(Eckart-Young; no data), with ``r = floor((1 - ratio) * out * in / (out + in))`` so that the two
factors would hold ``1 - ratio`` of its parameters. It is what "compress by low rank" means without
MoDeGPT's activation-aware modules, at the same parameter count as ``modegpt`` at the same ratio:
the baseline MoDeGPT is measured against (docs/methods/modegpt.md). The product is stored dense at
the original shape, so the export loads anywhere but is not smaller: a quality baseline, not a
method to ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compressor.step import Step, param, register_step

if TYPE_CHECKING:
    from compressor.context import BlockContext


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The rank-``rank`` approximation of ``weight`` (same dtype) and the share of its energy kept."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    energy = float(s[:rank].pow(2).sum() / s.pow(2).sum().clamp_min(1e-300))
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype), energy


def budget_rank(out_features: int, in_features: int, ratio: float) -> int:
    """The rank whose two factors hold ``1 - ratio`` of an ``out x in`` matrix's parameters."""
    return max(1, int((1 - ratio) * out_features * in_features / (out_features + in_features)))


@register_step("svd")
@dataclass
class TruncatedSVD(Step):
    """Plain truncated SVD of each block weight at 1 - ratio of its parameters (a baseline: stored dense)."""

    needs_calibration = False

    ratio: float = param(
        0.25, "fraction of each projection's parameters the two rank-r factors would save", min=0.0, max=0.95
    )
    ignore: list[str] = param([], "module name patterns left whole (glob, or re:REGEX)")

    @torch.no_grad()
    def compress_block(self, context: BlockContext) -> None:
        for name, linear in context.linears(self.ignore).items():
            rank = budget_rank(linear.out_features, linear.in_features, self.ratio)
            approximation, energy = truncated_svd(linear.weight, rank)
            linear.weight.copy_(approximation)
            context.record(
                name,
                rank=rank,
                energy_kept=round(energy, 6),
                parameters=rank * (linear.out_features + linear.in_features),
            )
