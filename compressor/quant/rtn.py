"""RTN: round-to-nearest uniform weight quantization, the baseline every method is measured against.

No paper: this is the textbook scheme (min-max ranges per group of ``group_size`` input columns,
round each weight to the nearest grid point) in the convention of compressed-tensors, so the
result exports losslessly to its ``pack-quantized`` format. Defaults: 4 bits, group 128, symmetric: the scheme
vLLM serves with Marlin, and the one transformers loads (its compressed-tensors loader cannot read
packed zero points yet: llm-compressor#1618, #1704). Asymmetric grids (``symmetric: false``) cost
``bits/group_size`` more bits per weight and give clearly lower error at 2-3 bits; they export
in the same format and load through ``compressor.export.load_quantized_model`` and vLLM.
Data-free: it never runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.quant.uniform import check_group_size, quantize_uniform, relative_error
from compressor.step import Step, param, register_step


@register_step("rtn")
@dataclass
class RTN(Step):
    """Round-to-nearest uniform quantization of every block linear (the baseline)."""

    bits: int = param(4, "bits per weight", choices=range(2, 9))
    group_size: int = param(128, "input columns sharing one scale; -1 for one scale per output row")
    symmetric: bool = param(True, "symmetric grid without zero points (false: per-group zero points)")
    ignore: list[str] = param(["lm_head"], "module names or patterns left unquantized (glob, or re:REGEX)")

    needs_calibration = False

    def check(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} is not -1 or a positive integer")

    def compress_block(self, context) -> None:
        linears = context.linears(self.ignore)
        for name, linear in linears.items():
            check_group_size(f"{context.prefix}.{name}", linear.in_features, self.group_size)
        for name, linear in linears.items():
            weight = linear.weight.data
            quantized = quantize_uniform(weight, self.bits, self.group_size, self.symmetric, context.scale_dtype)
            context.replace_linear(name, quantized)
            context.record(name, error=relative_error(weight, quantized), bits_per_weight=quantized.bits_per_weight())
