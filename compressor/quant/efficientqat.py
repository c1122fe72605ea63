"""EfficientQAT: Block-AP then E2E-QP (Chen et al., "EfficientQAT: Efficient Quantization-Aware
Training for Large Language Models", arXiv 2407.11062; official code OpenGVLab/EfficientQAT).

Uniform, group-wise integer weights (``UniformWeight``, so the compressed-tensors exporter and the
kernels take them unchanged) found by quantization-aware training in two phases:

**Block-AP** (``efficientqat_block_ap``, a layer step; ``quantize/block_ap.py``). For each decoder
block in turn, every linear gets a fake quantizer ``W_hat = (clamp(round(W/s) + z, 0, 2^b-1) - z) * s``
with straight-through rounding (``z`` itself rounded and clamped to the grid with a STE), initialised
from the min-max range of each group. All of the block's weights, the norm gains (the official code
selects every parameter named ``*weight*``) and every ``s`` and ``z`` are trained together with AdamW
(two groups: ``quant_lr`` for s and z, ``weight_lr`` for the rest; weight decay 0; each with its own
cosine from lr to lr / ``min_lr_factor``, stepped per batch; batches in a fixed order; no gradient
clipping) to minimise the MSE between the quantized block fed the outputs of the already-quantized
blocks before it and the fp block fed fp inputs. So two activation streams run: the session's
inputs are the quantized chain; the step keeps the fp chain itself (the fp block's outputs on the
fp inputs are this block's targets and the next block's fp inputs). The trained block is then frozen
to integer codes with its scales and zero points.

**E2E-QP** (``efficientqat_e2e_qp``, a model step; ``main_e2e_qp.py``). With the integer codes (and
zero points) frozen, only the step sizes of every quantized linear are trained, in fp32, end to end
on the calibration tokens through ``context.forward_backward`` (block by block, so memory is the
model plus gradients and AdamW state for the scales only): AdamW, weight decay 0, gradients clipped
to norm 0.3, cosine schedule with 3 % linear warmup. The loss (``objective``) is the paper's
next-token cross-entropy (``next_token``) or, our default, the KL divergence to the original model's
next-token distribution (``distill``: its top-``top_k`` log-probabilities per token plus one bucket,
``compressor.distill``, computed once by reading the original checkpoint again and running it block
by block). ``train_zeros: true``
also trains the zero points (rounded and clamped with a STE, so they stay integers); the official
code does not.

Defaults are the official code's: Block-AP ``main_block_ap.py`` (4 bits, group 128, 2 epochs, batch
2, quant_lr 1e-4, weight_lr 1e-5 with 2e-5 for 2 bits as in ``examples/block_ap/*/w2*.sh``,
min_lr_factor 20, min-max init) on 4096 RedPajama windows of 2048 tokens (+64 for validation);
E2E-QP ``examples/e2e_qp/Llama-2-7b/*-redpajama.sh`` (lr 2e-5 for 2 bits, 1e-5 for 3 and 4, 32
sequences per step as 4 x 8 accumulation, 1 epoch, 4096 windows of 4096 tokens). The calibration
set is the recipe's ``calibration`` section. The recipes in ``recipes/efficientqat-*.yaml`` scale
the data down for the bundled demo model on a CPU (16-128 windows of 512 tokens) and make up for it
with more epochs and smaller batches; they say so.

Deviations from the official code, and why:

* Init: the min-max range of each group is widened to include 0 (``uniform.minmax_params``, the
  convention of RTN and compressed-tensors), so the untrained quantizer *is* asymmetric RTN and the
  zero point always lies on the grid. The official init uses the raw min and max, which for a group
  of one sign puts ``z`` off the grid, and its forward then clamps it.
* Scales are clamped to ``[1e-8, 1e4]`` in the forward instead of ``[1e-4, 1e4]``: 1e-4 is coarser
  than the 8-bit step of small weights, and must not change the grid RTN would choose.
* Training runs in fp32 without AMP (the official code uses fp16 autocast with loss scaling); the
  stored scales are rounded to the export dtype before the codes are computed, as everywhere here.
* No validation split or early stopping in Block-AP (the official early stop is off by default);
  the report records each block's reconstruction MSE with the min-max (RTN) init and after training.
* E2E-QP's default loss is distillation towards the original model, not the next-token loss. The
  paper's E2E-QP is in effect continued pretraining on 4096 x 4096 tokens of generic text; on a small
  calibration set the next-token loss fits that text instead of the original model: on the demo,
  perplexity falls below fp (in-domain) while the mean KL to fp *rises* (w4: 0.0019 against RTN's
  0.0006). Distillation keeps the quantized model close to the original: mean KL w2 0.0013, w3
  0.0004, w4 0.0001 (32 windows; GPTQ 0.0015 / 0.0004 / 0.0001 in the same benchmark). It costs one
  forward pass of the original model over the calibration set and ``top_k`` x 12 bytes per token of
  host memory (4096 x 2048 tokens, k = 64: 6.4 GB). ``objective: next_token`` is the paper's.
* E2E-QP also trains the codebooks of lookup-table weights (SqueezeLLM's ``lut``, fp32 while
  training, codes frozen) the way it trains step sizes (``trained_tensor``): the same end-to-end
  phase for a non-uniform quantizer (``recipes/squeezellm-w*-e2e.yaml``). Not in the paper.
* E2E-QP trains on the recipe's calibration windows (one source for both phases; the paper uses a
  separate RedPajama or Alpaca set), reshuffled each epoch; its warmup starts at lr / (warmup + 1)
  rather than at 0, so no step is wasted when there are only a few.
* ``symmetric: true`` is offered (z fixed at 2^(b-1), only s and W trained): the paper is
  asymmetric, which is our default, but transformers cannot load packed asymmetric zero points
  (llm-compressor#1618; vLLM and ``compressor.export.load_quantized_model`` can), see ``rtn.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.blockwise import first_output
from compressor.weights.formats import UniformWeight
from compressor.quant.uniform import UniformQuantizer, clamp_ste, minmax_params, quantize_codes, relative_error, round_ste, storable_scale
from compressor.step import param, register_step

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

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, symmetric: bool):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.weight = nn.Parameter(linear.weight.detach().float())
        scale, zero = minmax_params(self.weight.detach(), bits, group_size, symmetric, torch.float32)
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


# ----------------------------------------------------------------------------------------------
# Block-AP


def cosine_lr(base: float, floor: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` (step 0) towards ``floor`` (step ``total``)."""
    return floor + (base - floor) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def cast_floating(value, dtype: torch.dtype):
    """``value`` (a tensor, or tuples/lists/dicts of them) with floating tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


def slice_batch(value, rows: slice, batch: int):
    """Rows ``rows`` of every tensor in ``value`` whose first dim is the batch (masks); others as is."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(slice_batch(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: slice_batch(v, rows, batch) for k, v in value.items()}
    return value


def micro_batches(inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict], size: int) -> list[tuple]:
    """(input, target, kwargs) of ``size`` samples each, cut from the session's batches, in order."""
    batches = []
    for x, y, kw in zip(inputs, targets, kwargs):
        for start in range(0, len(x), size):
            rows = slice(start, start + size)
            batches.append((x[rows], y[rows], slice_batch(kw, rows, len(x))))
    return batches


def block_mse(block: nn.Module, batches: list[tuple]) -> float:
    """Mean reconstruction MSE of ``block`` over ``batches`` (sample-weighted)."""
    total = count = 0.0
    with torch.no_grad():
        for x, y, kw in batches:
            dtype = next(block.parameters()).dtype
            out = first_output(block(x.to(dtype), **cast_floating(kw, dtype)))
            total += float(F.mse_loss(out.float(), y.float())) * len(x)
            count += len(x)
    return total / max(count, 1)


def trainable_groups(block: nn.Module, quant_lr: float, weight_lr: float, train_norms: bool) -> list[dict]:
    """AdamW groups: s and z of every fake-quantized linear at ``quant_lr``; their weights, and with
    ``train_norms`` every other parameter of the block (the norm gains), at ``weight_lr``. Only these
    require grad afterwards."""
    block.requires_grad_(False)
    fake = [m for m in block.modules() if isinstance(m, FakeQuantLinear)]
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


def train_block(block: nn.Module, batches: list[tuple], groups: list[dict], epochs: int, min_lr_factor: float) -> list[float]:
    """AdamW on the reconstruction MSE, per-group cosine schedules stepped per batch; mean loss per epoch."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    bases = [group["lr"] for group in optimizer.param_groups]
    total, step, epoch_losses = epochs * len(batches), 0, []
    with torch.enable_grad():
        for _ in range(epochs):
            losses = []
            for x, y, kw in batches:
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = cosine_lr(base, base / min_lr_factor, step, total)
                out = first_output(block(x.float(), **cast_floating(kw, torch.float32)))
                loss = F.mse_loss(out, y.float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"efficientqat_block_ap: the reconstruction loss became {float(loss)}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
            epoch_losses.append(sum(losses) / len(losses))
    block.requires_grad_(False)
    return epoch_losses


@register_step("efficientqat_block_ap")
@dataclass
class EfficientQATBlockAP(UniformQuantizer):
    """EfficientQAT Block-AP: per block, train weights, scales and zero points (STE) to reconstruct its fp outputs."""

    symmetric: bool = param(False, "fixed mid-point zero (transformers loads it); false: trained zero points, as in the paper")
    epochs: int = param(2, "passes over the calibration samples per block (0: min-max init only, i.e. RTN)", min=0)
    batch_size: int = param(2, "samples per optimizer step", min=1)
    quant_lr: float = param(1e-4, "AdamW learning rate of scales and zero points (0: frozen)", min=0.0)
    weight_lr: float | None = param(None, "AdamW learning rate of the weights and norm gains (0: frozen); default 2e-5 at 2 bits, 1e-5 otherwise", min=0.0)
    min_lr_factor: float = param(20.0, "each cosine schedule ends at lr / min_lr_factor", min=1.0)
    train_norms: bool = param(True, "also train the block's norm gains (the official code does)")

    def check(self) -> None:
        super().check()
        if self.epochs > 0 and self.quant_lr == 0 and self.learning_rate_of_weights == 0:
            raise ValueError("quant_lr: quant_lr and weight_lr are both 0, so nothing would train; set epochs: 0 for the min-max init alone")

    @property
    def learning_rate_of_weights(self) -> float:
        if self.weight_lr is not None:
            return self.weight_lr
        return 2e-5 if self.bits == 2 else 1e-5

    def compress_block(self, context) -> None:
        started = time.perf_counter()
        linears = self.quantizable_linears(context)
        # Two streams: context.inputs come from the already-quantized blocks; the fp chain is ours,
        # kept in the run's state for this step (the outputs of the fp blocks so far).
        fp_inputs = context.inputs if context.index == 0 else context.state["fp_inputs"]
        targets = context.forward(inputs=fp_inputs)  # the fp block on fp inputs
        context.state["fp_inputs"] = None if context.index == context.num_blocks - 1 else targets

        block, dtype = context.block, next(context.block.parameters()).dtype
        originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
        fake = {name: FakeQuantLinear(linear, self.bits, self.group_size, self.symmetric) for name, linear in linears.items()}
        for name, module in fake.items():
            block.set_submodule(name, module)
        block.float()
        batches = micro_batches(context.inputs, targets, context.block_kwargs, self.batch_size)
        mse_init = block_mse(block, batches)
        losses = []
        if self.epochs > 0:
            groups = trainable_groups(block, self.quant_lr, self.learning_rate_of_weights, self.train_norms)
            losses = train_block(block, batches, groups, self.epochs, self.min_lr_factor)
        quantized = {name: module.freeze(context.scale_dtype) for name, module in fake.items()}
        block.to(dtype)  # the trained norm gains and the biases back to the pass dtype
        for name, value in quantized.items():
            context.replace_linear(name, value)
            context.record(name, error=relative_error(originals[name], value), bits_per_weight=value.bits_per_weight())
        context.record(
            "block_ap", mse_init=mse_init, mse_final=block_mse(block, batches), loss_first_epoch=losses[0] if losses else None,
            loss_last_epoch=losses[-1] if losses else None, steps=self.epochs * len(batches), seconds=time.perf_counter() - started,
        )
