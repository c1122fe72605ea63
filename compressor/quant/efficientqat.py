"""EfficientQAT Block-AP: block-wise training of weights, scales and zero points into uniform integers.

Paper: Chen et al., "EfficientQAT: Efficient Quantization-Aware Training for Large Language Models",
arXiv 2407.11062; official code OpenGVLab/EfficientQAT (``quantize/block_ap.py``). Its second phase,
E2E-QP, is ``e2e_qp.py``.

Per decoder block, every linear gets a fake quantizer ``W_hat = (clamp(round(W/s) + z, 0, 2^b-1) - z) * s``
with straight-through rounding, initialised from each group's min-max range. The block's weights,
norm gains and every ``s`` and ``z`` train together (AdamW, a cosine schedule per group: ``quant_lr``
for s and z, ``weight_lr`` for the rest) so that the quantized block, fed the outputs of the
already-quantized blocks, reproduces the fp block on fp inputs (the step keeps that fp chain in
``context.state``). The block is then frozen to ``UniformWeight`` (exported as compressed-tensors).

Defaults: the official ``main_block_ap.py`` (4 bits, group 128, 2 epochs, batch 2, quant_lr 1e-4,
weight_lr 1e-5, 2e-5 at 2 bits, min_lr_factor 20). Deviations: the min-max init includes 0 (the
untrained quantizer is asymmetric RTN); scales clamped to [1e-8, 1e4]; fp32 without AMP; a held-out
tenth of the batches picks the epoch kept (``heldout``); ``symmetric: true`` offered for plain
transformers. Their reasons and the measured numbers: docs/methods/efficientqat.md.
Not in the paper: ``init: gptq`` starts from GPTQ's rounding of the block (``gptq.py``, true-sequential, its
default damping and order) instead of min-max RTN: weights at its dequantized values, its scales and zeros.

FP4 grids (``grid: nvfp4 | mxfp4``, ``weights/values.py``; not in the paper): the same training with
``FakeFloatLinear``, whose E2M1 rounding and block scales are straight-through in the form the grid stores them
(NVFP4: E4M3 under a global scale; MXFP4: a power of two with a trained exponent), frozen to ``FloatWeight``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from compressor.arch import input_groups
from compressor.quant.gptq import GPTQ, sequential_hessians
from compressor.quant.uniform import (
    UniformQuantizer,
    clamp_ste,
    minmax_params,
    quantize_codes,
    relative_error,
    round_ste,
    storable_scale,
)
from compressor.step import param, register_step
from compressor.training import block_dtype, block_mse, holdout_count, micro_batches, train_block
from compressor.weights.values import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_TINY,
    E8M0_BIAS,
    FloatGrid,
    FloatWeight,
    UniformWeight,
    e2m1_codes,
    e2m1_values,
    e4m3_codes,
    e4m3_values,
    effective_scales,
    grid_params,
    round_to_grid,
)

if TYPE_CHECKING:
    from compressor.context import BlockContext

SCALE_MIN, SCALE_MAX = 1e-8, 1e4


# ----------------------------------------------------------------------------------------------
# The quantizer (both phases)


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``W_hat`` [N, K] on the grid of per-group ``scale`` [N, G] and ``zero`` [N, G] (float, trained;
    None: symmetric, z = 2^(b-1)), differentiable in all three: STE rounding of ``W/s`` and of ``z``,
    a hard clamp of the codes to ``[0, 2^b - 1]`` (no gradient to W outside the range)."""
    n, k = weight.shape
    qmax = 2**bits - 1
    s = clamp_ste(scale, SCALE_MIN, SCALE_MAX).unsqueeze(-1)
    z = clamp_ste(round_ste(zero), 0, qmax).unsqueeze(-1) if zero is not None else 2 ** (bits - 1)
    codes = (round_ste(weight.reshape(n, scale.shape[1], -1) / s) + z).clamp(0, qmax)
    return ((codes - z) * s).reshape(n, k)


class FakeQuantLinear(nn.Module):
    """A linear whose weight passes through ``fake_quantize`` while W, s and z train together (fp32).
    The bias stays frozen, as in the official code."""

    def __init__(
        self, linear: nn.Linear, bits: int, group_size: int, symmetric: bool, init: UniformWeight | None = None
    ):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.weight = nn.Parameter(linear.weight.detach().float())
        if init is None:
            scale, zero = minmax_params(self.weight.detach(), bits, group_size, symmetric, torch.float32)
        else:  # the grid of a rounding already done (GPTQ), the weight holding its dequantized values
            scale, zero = init.scales.float(), init.zeros
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero.float()) if zero is not None else None
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize(self.weight, self.scale, self.zero, self.bits)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self, scale_dtype: torch.dtype) -> UniformWeight:
        """Integer codes and the stored scales and zeros; scales are rounded to ``scale_dtype`` first."""
        scale = storable_scale(self.scale.clamp(SCALE_MIN, SCALE_MAX), scale_dtype)
        zero = None if self.zero is None else self.zero.round().clamp(0, 2**self.bits - 1).to(torch.int32)
        codes = quantize_codes(self.weight, scale, zero, self.bits, self.group_size)
        return UniformWeight(codes=codes, scales=scale, zeros=zero, bits=self.bits, group_size=self.group_size)


class FakeFloatLinear(nn.Module):
    """``FakeQuantLinear`` on an FP4 grid (``weights/values.py``): ``W_hat = e2m1(W / s) * s`` per block, the E2M1
    rounding straight-through inside [-6, 6]. ``s`` trains as the grid stores it: NVFP4 as an E4M3 value under a
    global scale (``e4m3(s g) / g``, g = 448 / max s, rounded straight-through), MXFP4 as a power of two whose
    exponent ``t`` trains (``s = 2^round(t)``, straight-through). Initialised from RTN's scales."""

    def __init__(self, linear: nn.Linear, grid: FloatGrid):
        super().__init__()
        self.grid = grid
        self.weight = nn.Parameter(linear.weight.detach().float())
        scales, global_scale = grid_params(grid, self.weight.detach(), torch.float32)
        effective = effective_scales(grid, scales, global_scale)
        self.scale = nn.Parameter(effective.log2() if grid.scale == "e8m0" else effective)
        self.zero = None
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def block_scales(self) -> torch.Tensor:
        """The effective scale of every block as the grid can store it (straight-through)."""
        if self.grid.scale == "e8m0":
            return torch.exp2(round_ste(self.scale))
        scale = self.scale.clamp(min=SCALE_MIN)
        global_scale = E4M3_MAX / scale.detach().max()
        stored = scale * global_scale
        rounded = e4m3_values(e4m3_codes(stored)).clamp(min=E4M3_TINY)  # a scale never rounds to 0
        return (stored + (rounded - stored).detach()) / global_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        scale = self.block_scales().unsqueeze(-1)
        scaled = (self.weight.reshape(n, -1, self.grid.group_size) / scale).clamp(-E2M1_MAX, E2M1_MAX)
        rounded = scaled + (e2m1_values(e2m1_codes(scaled)) - scaled).detach()
        weight = (rounded * scale).reshape(n, k)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def largest_scale(self) -> float:
        return float(self.scale.detach().clamp(min=SCALE_MIN).max())

    @torch.no_grad()
    def freeze(self, scale_dtype: torch.dtype, largest_scale: float | None = None) -> FloatWeight:
        """The stored scales (E8M0 exponents, or E4M3 with their global scale) and the codes under them. NVFP4:
        ``largest_scale``, the largest block scale of the fused shards this one is served with (q/k/v, gate/up),
        sets the global scale they share (``uniform.shared_global_scales``); their scales are rounded to E4M3 again
        under it (each within half an E4M3 step of its trained value, as in training)."""
        if self.grid.scale == "e8m0":
            scales, global_scale = (self.scale.round() + E8M0_BIAS).clamp(0, 254).to(torch.uint8), None
        else:
            scale = self.scale.clamp(min=SCALE_MIN)
            global_scale = torch.tensor([E4M3_MAX / (largest_scale or float(scale.max()))], dtype=torch.float32)
            scales = (scale * global_scale).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn)
        codes = round_to_grid(self.grid, self.weight, scales, global_scale)
        return FloatWeight(codes, scales, global_scale, self.grid.name)


def fused_largest_scales(adapter, fake: dict) -> dict[str, float]:
    """NVFP4: the largest trained block scale over the linears that read one same input (engines fuse them and
    keep one global scale), for each of them; empty for other grids."""
    shared = {}
    for group in input_groups(adapter):
        members = [n for n in group if isinstance(fake.get(n), FakeFloatLinear) and fake[n].grid.global_scale]
        if members:
            largest = max(fake[n].largest_scale() for n in members)
            shared.update({n: largest for n in members})
    return shared


# ----------------------------------------------------------------------------------------------
# Block-AP


def trainable_groups(block: nn.Module, quant_lr: float, weight_lr: float, train_norms: bool) -> list[dict]:
    """AdamW groups: s and z of every fake-quantized linear at ``quant_lr``; their weights, and with
    ``train_norms`` every other parameter of the block (the norm gains), at ``weight_lr``. Only these
    require grad afterwards."""
    block.requires_grad_(False)
    fake = [m for m in block.modules() if isinstance(m, (FakeQuantLinear, FakeFloatLinear))]
    quant = [p for m in fake for p in (m.scale, m.zero) if p is not None]
    weights = [m.weight for m in fake]
    if train_norms:
        owned = {id(p) for m in fake for p in m.parameters()}
        weights += [p for p in block.parameters() if id(p) not in owned and p.is_floating_point()]
    groups = [g for g in ({"params": quant, "lr": quant_lr}, {"params": weights, "lr": weight_lr}) if g["lr"] > 0]
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    return groups


@register_step("efficientqat_block_ap")
@dataclass
class EfficientQATBlockAP(UniformQuantizer):
    """EfficientQAT Block-AP: per block, train weights, scales and zero points (STE) to reconstruct its fp outputs."""

    distributes = "gradients"  # the single process's steps over every rank's samples, gradients summed (training.py)
    grids = ("int", "nvfp4", "mxfp4")  # FP4: trainable block scales on the grid (FakeFloatLinear)

    symmetric: bool = param(
        False, "fixed mid-point zero (transformers loads it); false: trained zero points, as in the paper"
    )
    epochs: int = param(2, "passes over the calibration samples per block (0: min-max init only, i.e. RTN)", min=0)
    batch_size: int = param(2, "samples per optimizer step", min=1)
    quant_lr: float = param(1e-4, "AdamW learning rate of scales and zero points (0: frozen)", min=0.0)
    weight_lr: float | None = param(
        None,
        "AdamW learning rate of the weights and norm gains (0: frozen); default 2e-5 at 2 bits, 1e-5 otherwise",
        min=0.0,
    )
    min_lr_factor: float = param(20.0, "each cosine schedule ends at lr / min_lr_factor", min=1.0)
    train_norms: bool = param(True, "also train the block's norm gains (the official code does)")
    init: str = param(
        "minmax",
        "starting point: each group's min-max grid on the fp weights (the paper's: RTN), or GPTQ's rounding "
        "(codes, scales and zeros, taken true-sequentially inside the block as the gptq step does)",
        choices=("minmax", "gptq"),
    )
    heldout: float = param(
        0.1,
        "fraction of each block's calibration batches held out: their MSE before training and after each epoch "
        "decides which state the block keeps (0: train on all, keep the last)",
        min=0.0,
        max=0.5,
    )

    def check(self) -> None:
        super().check()
        if self.epochs > 0 and self.quant_lr == 0 and self.learning_rate_of_weights == 0:
            raise ValueError(
                "quant_lr: quant_lr and weight_lr are both 0, so nothing would train; set epochs: 0 for the min-max "
                "init alone"
            )
        if self.init == "gptq" and self.float_grid is not None:
            raise ValueError(f"init: gptq starts from integer GPTQ rounding; grid {self.grid} starts from min-max")

    @property
    def learning_rate_of_weights(self) -> float:
        if self.weight_lr is not None:
            return self.weight_lr
        return 2e-5 if self.bits == 2 else 1e-5

    def compress_block(self, context: BlockContext) -> None:
        started = time.perf_counter()
        linears = context.linears(self.ignore)
        # Two streams: context.inputs come from the already-quantized blocks; the fp chain is ours,
        # kept in the run's state for this step (the outputs of the fp blocks so far).
        fp_inputs = context.inputs if context.index == 0 else context.state["fp_inputs"]
        targets = context.forward(inputs=fp_inputs)  # the fp block on fp inputs
        context.state["fp_inputs"] = None if context.index == context.num_blocks - 1 else targets

        block, dtype = context.block, block_dtype(context.block)
        originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
        inits = self.gptq_init(context, linears) if self.init == "gptq" else {}
        fake = {
            name: FakeQuantLinear(linear, self.bits, self.group_size, self.symmetric, inits.get(name))
            if self.float_grid is None
            else FakeFloatLinear(linear, self.float_grid)
            for name, linear in linears.items()
        }
        for name, module in fake.items():
            block.set_submodule(name, module)
        block.float()
        # several processes: the single process's steps, each rank the samples of a step it holds (distributed.py)
        distributed = context.run.distributed
        batches = micro_batches(context.inputs, targets, context.block_kwargs, self.batch_size)
        mse_init = block_mse(block, batches, distributed)
        losses, best = [], None
        if self.epochs > 0:
            groups = trainable_groups(block, self.quant_lr, self.learning_rate_of_weights, self.train_norms)
            steps = self.epochs * (len(batches) - holdout_count(len(batches), self.heldout))
            with context.progress(steps, "training", "step") as progress:
                losses, best = train_block(
                    block,
                    batches,
                    groups,
                    self.epochs,
                    self.min_lr_factor,
                    self.heldout,
                    progress,
                    distributed=distributed,
                    batch_size=self.batch_size,
                )
        largest = fused_largest_scales(context.adapter, fake)
        quantized = {
            name: module.freeze(context.scale_dtype, largest[name])
            if name in largest
            else module.freeze(context.scale_dtype)
            for name, module in fake.items()
        }
        block.to(dtype)  # the trained norm gains and the biases back to the pass dtype
        for name, value in quantized.items():
            context.replace_linear(name, value)
            context.record(name, error=relative_error(originals[name], value), bits_per_weight=value.bits_per_weight())
        context.record(
            "block_ap",
            mse_init=mse_init,
            mse_final=block_mse(block, batches, distributed),
            loss_first_epoch=losses[0] if losses else None,
            loss_last_epoch=losses[-1] if losses else None,
            steps=self.epochs * (len(batches) - holdout_count(len(batches), self.heldout)),
            seconds=time.perf_counter() - started,
            **(best.summary() if best else {}),
        )

    def gptq_init(self, context: BlockContext, linears: dict) -> dict[str, UniformWeight]:
        """GPTQ (its defaults, this step's grid) of every linear, true-sequentially: each linear's weight is
        replaced in place by its dequantized rounding, so the groups after it see it rounded."""
        rounding = GPTQ(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, ignore=self.ignore)
        inits = {}
        for names, catcher in sequential_hessians(context, linears):
            for name in names:
                weight = linears[name].weight
                inits[name] = rounding.round_linear(context, name, weight.data, catcher.hessian(name))[1].weight
                weight.data = inits[name].dequantize(weight.dtype)
        return inits
