"""Uniform (affine) group-wise quantization, shared by every uniform quantizer: their common recipe
parameters (``UniformQuantizer``) and the math, as plain functions on tensors. Conventions are those of
``values.UniformWeight`` and of compressed-tensors' ``pack-quantized`` format:

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` of each group maps onto ``[0, 2**b - 1]``,
  ``s = (max - min) / (2**b - 1)``, integer zero ``z = round(-min / s)``;
* symmetric: ``s = max|w| / ((2**b - 1) / 2)`` and ``z = 2**(b - 1)`` (compressed-tensors'
  ``calculate_qparams``), so codes ``u - z`` span ``[-2**(b-1), 2**(b-1) - 1]``;
* scales are rounded to their storage dtype *before* codes are computed, so the stored
  (scale, code) pairs reproduce the dequantized weight exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from compressor.arch import block_linears, input_groups
from compressor.blockwise import InputHooks
from compressor.modules.activations import ActivationSpec, install_attention_quantization
from compressor.step import Step, param
from compressor.weights.values import (
    ACTIVATION_FORMATS,
    FLOAT_GRIDS,
    FloatGrid,
    FloatWeight,
    UniformWeight,
    expand_groups,
    nvfp4_global_scale,
    row_chunks,
)

if TYPE_CHECKING:
    from compressor.context import BlockContext

ACTIVATION_BITS = (*range(2, 9), 16)
WEIGHT_GRIDS = ("int", *FLOAT_GRIDS)
ACTIVATION_GRIDS = ("int", *ACTIVATION_FORMATS)
CT_ACTIVATION_FORMATS = ("fp8", "mxfp4")  # float activations the compressed-tensors export records


@dataclass
class UniformQuantizer(Step):
    """The parameters every uniform quantizer shares (RTN, EfficientQAT Block-AP), and their checks.
    Not registered: a quantizer subclasses it (and may change a default by declaring the field again)."""

    quantizes_weights = True
    grids: ClassVar[tuple[str, ...]] = ("int",)  # the ``grid`` values the method can round onto

    @property
    def writes_plain_uniform(self) -> bool:
        """Its weights export as compressed-tensors (or GPTQ), not in our native format."""
        return True

    bits: int = param(4, "bits per weight", choices=range(2, 9))
    group_size: int = param(128, "input columns sharing one scale (and zero point); -1 for one per output row")
    symmetric: bool = param(True, "symmetric grid without zero points (false: per-group zero points)")
    grid: str = param(
        "int",
        "weight grid: int (bits, group_size, symmetric) or a float format that fixes them (weights/values.py): "
        "fp8 (E4M3 per channel), fp8-block (E4M3 per 128x128 block), nvfp4 (E2M1, 16 a block), mxfp4 (E2M1, 32)",
        choices=WEIGHT_GRIDS,
    )
    ignore: list[str] = param(["lm_head"], "module names or patterns left unquantized (glob, or re:REGEX)")

    def check(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} is not -1 or a positive integer")
        if self.grid not in self.grids:
            raise ValueError(f"grid: {self.name} rounds onto {', '.join(self.grids)} only, not {self.grid}")
        if self.float_grid is not None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in ("bits", "group_size", "symmetric"):
                if getattr(self, key) != defaults[key]:
                    raise ValueError(f"{key}: grid {self.grid} fixes bits, group_size and symmetric; drop {key}")

    @property
    def float_grid(self) -> FloatGrid | None:
        return FLOAT_GRIDS.get(self.grid)

    def check_model(self, linears: dict) -> None:
        """Checkpoint formats and serving kernels need whole groups: every linear it will take, before any work."""
        group_size = self.group_size if self.float_grid is None else self.float_grid.group_size
        if self.grid == "fp8-block":
            return  # blocks are padded (compressed-tensors' BLOCK strategy)
        for name, linear in linears.items():
            check_group_size(name, linear.in_features, group_size)

    def round_to_nearest(
        self,
        weight: torch.Tensor,
        scale_dtype: torch.dtype,
        global_scale: torch.Tensor | None = None,
        scheme: tuple[int, int] | None = None,
    ) -> UniformWeight | FloatWeight:
        """RTN of ``weight`` on this step's grid, integer or float (NVFP4: under ``global_scale`` when given);
        ``scheme`` (bits, group_size) in place of the step's own (a linear's allocated scheme)."""
        if self.float_grid is not None:
            return FloatWeight.quantize(weight, self.grid, scale_dtype, global_scale)
        bits, group_size = scheme or (self.bits, self.group_size)
        return quantize_uniform(weight, bits, group_size, self.symmetric, scale_dtype)


@dataclass
class ActivationQuantization(Step):
    """The activation keys of a W+A quantizer (RTN, QLLM): per-token dynamic fake-quantization of every
    quantized linear's input and, with ``quantize_attention``, of attention's Q, K and V. Not registered:
    a quantizer lists it first among its bases (before ``UniformQuantizer``: its keys then come after the weights')."""

    activation_bits: int = param(
        16,
        "bits of the per-token dynamic quantization of each quantized linear's input (16: off)",
        choices=ACTIVATION_BITS,
    )
    activation_symmetric: bool = param(False, "symmetric activation grid (false: per-token min-max with a zero point)")
    activation_grids: ClassVar[tuple[str, ...]] = ACTIVATION_GRIDS  # the ``activation_grid`` values it can use

    activation_grid: str = param(
        "int",
        "activation grid: int (activation_bits, activation_symmetric) or a dynamic float format, which turns "
        "activation quantization on by itself: fp8 (E4M3 per token), nvfp4, mxfp4 (E2M1 blocks)",
        choices=ACTIVATION_GRIDS,
    )
    quantize_attention: bool = param(
        True, "with activation_bits < 16, also quantize attention's Q, K (after RoPE) and V per token"
    )
    activation_global_scale: str = param(
        "token",
        "NVFP4 activations' global scale: one per token (our native format), or calibrated: one per layer from the "
        "calibration inputs' amax (compressed-tensors' input_global_scale, which vLLM and transformers read)",
        choices=("token", "calibrated"),
    )

    def check(self) -> None:
        super().check()
        if self.activation_grid not in self.activation_grids:
            raise ValueError(
                f"activation_grid: {self.name} quantizes activations on {', '.join(self.activation_grids)} only, "
                f"not {self.activation_grid}"
            )
        if self.activation_grid != "int" and (
            self.activation_bits not in (16, None) or self.activation_symmetric  # None: QLLM's default
        ):
            key = "activation_bits" if self.activation_bits not in (16, None) else "activation_symmetric"
            raise ValueError(f"{key}: activation_grid {self.activation_grid} fixes the activation grid; drop {key}")
        if self.activation_global_scale == "calibrated":
            if self.activation_grid != "nvfp4":
                raise ValueError(
                    f"activation_global_scale: calibrated is for activation_grid nvfp4, not {self.activation_grid}"
                )
            if self.quantize_attention:
                raise ValueError(
                    "activation_global_scale: calibrated (compressed-tensors' NVFP4) has no place for quantized "
                    "attention operands; set quantize_attention: false"
                )
            self.needs_calibration = True  # the input global scales come from the calibration inputs

    @property
    def activation_spec(self) -> ActivationSpec | None:
        if self.activation_grid != "int":
            static = self.activation_global_scale == "calibrated"
            return ActivationSpec(FLOAT_GRIDS[self.activation_grid].bits, True, self.activation_grid, static)
        return None if self.activation_bits == 16 else ActivationSpec(self.activation_bits, self.activation_symmetric)

    @property
    def writes_plain_uniform(self) -> bool:
        """Weight-only layers export as compressed-tensors; W+A ones in our native format, except the float
        activations compressed-tensors records (FP8 per token, MXFP4)."""
        spec = self.activation_spec
        return spec is None or spec.format in CT_ACTIVATION_FORMATS or spec.static_global_scale

    def refuse_other_weight_kinds(self, context: BlockContext) -> None:
        """Activation quantization here is for uniform weights (the W+A grid our native format records): an
        earlier step's lookup-table or other weights on this block are a one-line error, raised at block 0
        before this step does any work."""
        if self.activation_spec is None:
            return
        for name, module in block_linears(context.adapter, context.block).items():
            kind = getattr(getattr(module, "weight_type", None), "kind", None)
            if kind is not None and kind not in ("uniform", "float"):
                raise ValueError(
                    f"activation_bits: {self.activation_bits} needs uniform weights, but {context.prefix}.{name} "
                    f"already holds '{kind}' weights from an earlier step; drop activation_bits or run this step on "
                    "other layers"
                )

    def quantize_block_activations(
        self, context: BlockContext, quantized: dict, channel_maps: dict | None = None
    ) -> None:
        """Attach the activation spec (and each linear's channel map) to the block's new ``QuantizedLinear``
        modules ``quantized`` (path -> module), and quantize its attention operands."""
        spec = self.activation_spec
        global_scales = (
            calibrate_input_global_scales(context, list(quantized)) if spec and spec.static_global_scale else {}
        )
        for name, module in quantized.items():
            module.quantize_inputs(spec, (channel_maps or {}).get(name), global_scales.get(name))
        if spec is not None and self.quantize_attention:
            install_attention_quantization(context.block.get_submodule(context.adapter.attention), spec)


def shared_global_scales(adapter, linears: dict, grid: FloatGrid | None) -> dict[str, torch.Tensor]:
    """NVFP4: one weight global scale (``448 * 6 / amax`` over all of them) for the linears of ``linears`` (block
    paths) that read one same input (q/k/v, gate/up), which engines fuse into one GEMM: vLLM keeps one global
    scale per fused layer, the largest of its shards' (compressed_tensors_w4a4_nvfp4.py,
    process_weights_after_loading), so shards under other global scales would be served wrong. llm-compressor
    shares them the same way (``update_fused_layer_weight_global_scales``). Empty for other grids."""
    if grid is None or not grid.global_scale:
        return {}
    shared = {}
    for group in input_groups(adapter):
        members = [name for name in group if name in linears]
        if members:
            amax = max(float(linears[name].weight.detach().abs().amax()) for name in members)
            scale = nvfp4_global_scale(torch.tensor([amax]))
            shared.update({name: scale for name in members})
    return shared


class InputAmax(InputHooks):
    """The largest |input| each watched linear sees while the block runs."""

    def __init__(self, block, names: list[str]):
        super().__init__(block, names)
        self.amax = {name: torch.zeros((), dtype=torch.float32) for name in names}

    def catch(self, name: str, x: torch.Tensor) -> None:
        self.amax[name] = torch.maximum(self.amax[name], x.detach().abs().amax().float().cpu())


def calibrate_input_global_scales(context: BlockContext, names: list[str]) -> dict[str, torch.Tensor]:
    """NVFP4 ``input_global_scale`` (fp32 [1]) of each linear ``names`` of the block: ``448 * 6 / amax`` over its
    calibration inputs, as the block computes now (its earlier linears quantized), compressed-tensors'
    ``generate_gparam`` on the min-max of its NVFP4 preset's ``static_minmax`` observer; the maxima of all
    processes."""
    with torch.no_grad(), InputAmax(context.block, names) as watched:
        context.forward()
    scales = {}
    for name in names:
        amax = context.run.distributed.all_reduce_max(watched.amax[name].reshape(1).to(context.device)).cpu()
        scales[name] = nvfp4_global_scale(amax)
    return scales


def check_group_size(name: str, in_features: int, group_size: int) -> None:
    """Checkpoint formats and serving kernels need whole groups: fail before any work is done."""
    if group_size != -1 and in_features % group_size:
        raise ValueError(
            f"group_size: {name}: in_features {in_features} is not a multiple of group_size {group_size}; choose a "
            "group size that divides it, -1 (per channel), or add the layer to ignore"
        )


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group] with the last group zero-padded (zeros never widen a range that includes 0)."""
    n, k = weight.shape
    if group_size == -1:
        return weight.reshape(n, 1, k)
    pad = (-k) % group_size
    return F.pad(weight, (0, pad)).reshape(n, -1, group_size)


def storable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype, keeping them positive (an all-zero group gets the tiniest scale)."""
    tiny = torch.finfo(dtype).tiny
    return scale.clamp(min=tiny).to(dtype)


def minmax_params(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group scales [N, G] (in ``scale_dtype``) and zero points [N, G] (int32; None when symmetric).

    ``clip`` < 1 shrinks the range before the scale is chosen (a clipping search tries several).
    """
    groups = grouped(weight.float(), group_size)
    if symmetric:
        scale = groups.abs().amax(dim=-1) * clip / ((2**bits - 1) / 2)
        return storable_scale(scale, scale_dtype), None
    low = groups.amin(dim=-1).clamp(max=0) * clip
    high = groups.amax(dim=-1).clamp(min=0) * clip
    scale = storable_scale((high - low) / (2**bits - 1), scale_dtype)
    zero = torch.round(-low / scale.float()).clamp(0, 2**bits - 1).to(torch.int32)
    return scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward, identity in the backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp in the forward, identity in the backward (straight-through estimator)."""
    return x + (x.clamp(low, high) - x).detach()


def quantize_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Round ``weight`` [N, K] onto the grid given by per-group scales and zeros: uint8 codes."""
    n, k = weight.shape
    scale = expand_groups(scales.float(), k, group_size)
    zero = expand_groups(zeros.float(), k, group_size) if zeros is not None else 2 ** (bits - 1)
    codes = torch.round(weight.float() / scale) + zero
    return codes.clamp(0, 2**bits - 1).to(torch.uint8)


def quantize_uniform(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> UniformWeight:
    """Round-to-nearest with min-max group ranges (rows are independent: done in chunks)."""
    codes, scales, zeros = [], [], []
    for rows in row_chunks(*weight.shape):
        chunk_scales, chunk_zeros = minmax_params(weight[rows], bits, group_size, symmetric, scale_dtype)
        codes.append(quantize_codes(weight[rows], chunk_scales, chunk_zeros, bits, group_size))
        scales.append(chunk_scales)
        zeros.append(chunk_zeros)
    return UniformWeight(
        codes=torch.cat(codes),
        scales=torch.cat(scales),
        zeros=None if symmetric else torch.cat(zeros),
        bits=bits,
        group_size=group_size,
    )


def relative_error(weight: torch.Tensor, quantized) -> float:
    """||W - W_hat||_F / ||W||_F for any value type, dequantized a chunk of rows at a time."""
    error = norm = 0.0
    for rows in row_chunks(*weight.shape):
        part = quantized.rows(rows)
        original = weight[rows].float()
        error += float((original - part.dequantize(torch.float32)).square().sum())
        norm += float(original.square().sum())
    return (error / max(norm, 1e-30)) ** 0.5
