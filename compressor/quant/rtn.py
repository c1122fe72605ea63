"""RTN: round-to-nearest uniform weight quantization, the baseline every method is measured against.

No paper: this is the textbook scheme (min-max ranges per group of ``group_size`` input columns,
round each weight to the nearest grid point) in the convention of compressed-tensors, so the
result exports losslessly to its ``pack-quantized`` format. Defaults: 4 bits, group 128, symmetric: the scheme
vLLM serves with Marlin, and the one transformers loads (its compressed-tensors loader cannot read
packed zero points; the upstream issues: docs/methods/rtn.md). Asymmetric grids (``symmetric: false``) cost
``bits/group_size`` more bits per weight and give clearly lower error at 2-3 bits; they export
in the same format and load through ``compressor.export.load_quantized_model`` and vLLM.
Data-free: it never runs the model, except for NVFP4 activations with ``activation_global_scale: calibrated``,
whose per-layer input global scales come from the calibration inputs, and bit allocation (``bits_per_weight``,
``quant/allocation.py``: each serving-fused group at its own scheme under that average, scored on the data).

With ``activation_bits`` < 16 it is also the W+A baseline ("RTN W4A4 / W4A8"): every quantized
linear fake-quantizes its input per token (dynamic min-max, ``modules/activations.py``) and, with
``quantize_attention``, attention's Q, K and V; such checkpoints export in our native format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.quant.allocation import BitAllocation
from compressor.quant.uniform import (
    WEIGHT_GRIDS,
    ActivationQuantization,
    UniformQuantizer,
    quantize_uniform,
    relative_error,
    shared_global_scales,
)
from compressor.step import register_step

if TYPE_CHECKING:
    from compressor.context import BlockContext


@register_step("rtn")
@dataclass
class RTN(ActivationQuantization, BitAllocation, UniformQuantizer):
    """Round-to-nearest uniform quantization of every block linear (the baseline)."""

    needs_calibration = False
    distributes = "sums"  # bit allocation (the only data RTN reads): Fisher all-reduced, Hessians to owners
    grids = WEIGHT_GRIDS

    def check(self) -> None:
        super().check()
        if self.allocates:
            self.needs_calibration = True  # the allocation's Fisher and Hessians come from the calibration data

    def check_model(self, linears: dict) -> None:
        super().check_model(linears)
        self.check_budget(linears)

    def candidate_weight(self, weight, h, bits: int, group_size: int, scale_dtype):
        """RTN at another (bits, group_size): what bit allocation scores (``h`` only weighs the error)."""
        return quantize_uniform(weight, bits, group_size, self.symmetric, scale_dtype)

    def compress_block(self, context: BlockContext) -> None:
        self.refuse_other_weight_kinds(context)
        modules = {}
        linears = context.linears(self.ignore)
        global_scales = shared_global_scales(context.adapter, linears, self.float_grid)  # NVFP4's fused shards
        for name, linear in linears.items():
            weight = linear.weight.data
            scheme = self.scheme_for(context.state, f"{context.prefix}.{name}")
            quantized = self.round_to_nearest(weight, context.scale_dtype, global_scales.get(name), scheme)
            modules[name] = context.replace_linear(name, quantized)
            context.record(name, error=relative_error(weight, quantized), bits_per_weight=quantized.bits_per_weight())
        self.quantize_block_activations(context, modules)
