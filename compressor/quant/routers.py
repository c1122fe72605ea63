"""Quantizing the routers of a mixture-of-experts model, which every other step leaves alone (an explicit opt-in).

No paper. A router's weight ([experts, hidden]; ``mlp.gate``, and Qwen2-MoE's ``shared_expert_gate``) decides which
experts each token reaches, and a small error there flips routing, so the quantizers never see routers
(``arch.ExpertLayout.routers``) and no ``ignore`` pattern is needed to keep them. This step, named in the recipe,
rounds each router's weight to nearest on a uniform grid (min-max per group of ``group_size`` input columns, as
RTN) and keeps the rounded values in the checkpoint in its dtype: no serving engine reads a packed router (vLLM
builds the MoE gate with ``quant_config=None``; transformers 5's routers are not ``nn.Linear``, so
compressed-tensors cannot target them), so what changes is the values the engines compute with, not the size
(a bf16 checkpoint holds each code times its scale rounded to bf16: within half a bf16 step of the grid).
Defaults: 8 bits, per output row (group -1), symmetric: the scheme W8A8 recipes use for every other linear.
Data-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.arch import ADAPTERS
from compressor.quant.uniform import check_group_size, quantize_uniform, relative_error
from compressor.step import Step, param, register_step

if TYPE_CHECKING:
    from compressor.context import BlockContext


@register_step("quantize_routers")
@dataclass
class QuantizeRouters(Step):
    """Round the MoE routers' weights onto a uniform grid (kept in the checkpoint's dtype)."""

    needs_calibration = False
    families = tuple(adapter.family for adapter in ADAPTERS if adapter.experts is not None)  # the MoE families

    bits: int = param(8, "bits per router weight", choices=range(2, 9))
    group_size: int = param(-1, "input columns sharing one scale; -1 for one per expert (row)")
    symmetric: bool = param(True, "symmetric grid without zero points (false: per-group zero points)")

    def check_config(self, config) -> None:
        if self.group_size != -1:
            check_group_size("the routers", config.hidden_size, self.group_size)

    def compress_block(self, context: BlockContext) -> None:
        modules = dict(context.block.named_modules())
        for path in context.adapter.experts.routers:
            if path not in modules:  # a dense layer (DeepSeek's first ones) has no router
                continue
            weight = modules[path].weight
            rounded = quantize_uniform(weight.data, self.bits, self.group_size, self.symmetric, context.scale_dtype)
            context.record(path, error=relative_error(weight.data, rounded), bits_per_weight=float(self.bits))
            weight.data = rounded.dequantize(weight.dtype)
