"""E2E-QP: train only the step sizes (or codebooks) of an already quantized model end to end, codes frozen.

Paper: the second phase of EfficientQAT (Chen et al., arXiv 2407.11062; official
``main_e2e_qp.py``). With the integer codes (and zero points) frozen, the scales of every uniform
``QuantizedLinear`` (or the codebooks of lookup-table ones: SqueezeLLM's ``lut``; not in the paper)
train in fp32 through ``context.forward_backward`` with the shared trainer
(``distill.train_end_to_end``): AdamW, weight decay 0, gradients clipped to norm 0.3, cosine schedule
with 3 % linear warmup. It trains what any quantizer produced (put ``rtn``,
``efficientqat_block_ap`` or ``squeezellm`` before it).

Defaults are the official scripts' (``examples/e2e_qp/Llama-2-7b/*-redpajama.sh``: lr 2e-5 at 2 bits,
1e-5 at 3 and 4; 32 sequences per step as 4 x 8 accumulation; 1 epoch). Deviations: the default
loss is the KL to the original model's top-k next-token distribution (``objective: distill``; the
paper's next-token loss, ``next_token``, fits a small calibration set instead of the original
model); it trains on the recipe's calibration windows (``heldout`` of them kept aside to choose the
best epoch), reshuffled each epoch; warmup starts at lr / (warmup + 1); ``train_zeros: true`` also
trains zero points (STE-rounded integers). Details and measured numbers: docs/methods/efficientqat.md.

Float weights (``weights/values.py``) train their scales so that the trained model is the exported one: FP8's
per-channel or block scales as uniform scales (rounded to their 16-bit dtype when frozen); NVFP4's block scales as
the effective scale ``s`` (what multiplies E2M1 values, so ``lr`` means what it means for uniform scales), stored
``e4m3(s g)`` under the frozen global scale ``g``: rounded to E4M3 straight-through in every forward, kept in
[2**-9, 448]. MXFP4 is refused: its E8M0 scales are powers of two, one step of a scale is a factor 2, which the
small steps of E2E-QP (lr ~1e-5, Adam moves a parameter about lr a step) never reach; Block-AP trains them
(``efficientqat_block_ap`` with ``grid: mxfp4``, its log2 scales at ``quant_lr`` 1e-3, block by block).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.distill import check_top_k, train_end_to_end
from compressor.modules.linear import QuantizedLinear
from compressor.quant.uniform import clamp_ste, round_ste
from compressor.report import peak_memory
from compressor.step import Step, param, register_step
from compressor.training import warmup_cosine_schedule
from compressor.weights.values import E4M3_TINY, FLOAT_GRIDS, FloatWeight, e4m3_codes, e4m3_values

if TYPE_CHECKING:
    from compressor.context import ModelContext


class E4M3ScaleOnGrid(nn.Module):
    """Parametrization of NVFP4's trained block scales: the parameter is the effective scale ``s``, the module sees
    the stored ``e4m3(s g)`` (positive, at most 448), rounded straight-through."""

    def __init__(self, global_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("global_scale", global_scale.detach().float().clone())

    def forward(self, effective: torch.Tensor) -> torch.Tensor:
        stored = effective * self.global_scale
        rounded = e4m3_values(e4m3_codes(stored)).clamp(min=E4M3_TINY)
        return stored + (rounded - stored).detach()


def float_scale_format(module: QuantizedLinear) -> str | None:
    """How a float weight's scales are stored ("float", "e4m3" or "e8m0"); None for other weights."""
    return FLOAT_GRIDS[module.weight_static["grid"]].scale if module.weight_type is FloatWeight else None


class RoundToGrid(nn.Module):
    """Parametrization of trained zero points: rounded and clamped to ``[0, qmax]`` with a STE."""

    def __init__(self, qmax: int):
        super().__init__()
        self.qmax = qmax

    def forward(self, zero: torch.Tensor) -> torch.Tensor:
        return clamp_ste(round_ste(zero), 0, self.qmax)


def trained_tensor(module: QuantizedLinear) -> str | None:
    """What E2E-QP trains in a quantized linear: a uniform value's step sizes (``scales``) or a
    lookup-table value's codebooks (``lut``, SqueezeLLM); None for anything else."""
    return next(
        (name for name in ("scales", "lut") if name in module.tensor_names and getattr(module, name) is not None), None
    )


@register_step("efficientqat_e2e_qp")
@dataclass
class EfficientQATE2EQP(Step):
    """EfficientQAT E2E-QP: train the step sizes (or codebooks) of quantized linears end to end, codes frozen."""

    lr: float = param(
        2e-5, "AdamW learning rate of the scales (official scripts: 2e-5 at 2 bits, 1e-5 at 3 and 4)", min=0.0
    )
    epochs: int = param(1, "passes over the calibration tokens", min=1)
    batch_size: int = param(32, "sequences per optimizer step", min=1)
    micro_batch_size: int = param(4, "sequences per forward and backward (gradients accumulate over a step)", min=1)
    warmup_ratio: float = param(0.03, "fraction of the steps with linear warmup", min=0.0, max=1.0)
    max_grad_norm: float | None = param(0.3, "clip the scales' gradient norm (null: no clipping)", min=0.0)
    train_zeros: bool = param(False, "also train the zero points (integers, by STE); the official code does not")
    zero_lr: float = param(1e-4, "AdamW learning rate of the zero points, with train_zeros", min=0.0)
    seed: int = param(42, "seed of the sample order (shuffled every epoch)")
    objective: str = param(
        "distill",
        "training loss: distill (KL to the original model's top-k next-token distribution) or next_token (the paper's "
        "cross-entropy on the calibration text)",
        choices=("distill", "next_token"),
    )
    top_k: int = param(
        64, "with objective: distill, teacher log-probabilities kept per token (the rest is one bucket)", min=1
    )
    heldout: float = param(
        0.1,
        "fraction of the calibration sequences held out: the loss on them is measured before training and after each "
        "epoch, and the best state is kept (0: train on all, keep the last)",
        min=0.0,
        max=0.5,
    )
    ignore: list[str] = param(["lm_head"], "quantized linears whose scales stay frozen (glob, or re:REGEX)")

    kind = "model"
    distributes = "gradients"  # each rank the sequences of every step it holds, gradients summed (distill.py)
    commits_progress = True  # the trainer commits its state for --resume (distill.train_end_to_end)

    def check_config(self, config) -> None:
        check_top_k(self.top_k, config)

    def compress_model(self, context: ModelContext) -> None:
        started = time.perf_counter()
        modules = {name: m for name, m in context.quantized_linears(self.ignore).items() if trained_tensor(m)}
        if not modules:
            raise ValueError(
                f"{self.name}: the model has no quantized linears with scales or codebooks; put a quantizer such as "
                "efficientqat_block_ap, rtn or squeezellm before it"
            )
        mxfp4 = next((name for name, m in modules.items() if float_scale_format(m) == "e8m0"), None)
        if mxfp4 is not None:
            raise ValueError(
                f"{self.name}: {mxfp4} holds MXFP4 weights, whose E8M0 scales are powers of two that E2E-QP's small "
                "steps never move (a step is a factor 2); train them in efficientqat_block_ap, or ignore these linears"
            )
        steps_or_codebooks, zeros = [], []
        for module in modules.values():
            steps_or_codebooks += module.train_tensors([trained_tensor(module)])
            if float_scale_format(module) == "e4m3":  # NVFP4: train the effective scale, stored as E4M3
                with torch.no_grad():
                    module.scales.div_(module.global_scale.float())
                parametrize.register_parametrization(module, "scales", E4M3ScaleOnGrid(module.global_scale))
            if self.train_zeros and getattr(module, "zeros", None) is not None:  # lookup tables have none
                zeros += module.train_tensors(["zeros"])
                parametrize.register_parametrization(
                    module, "zeros", RoundToGrid(2 ** module.weight_static["bits"] - 1)
                )
        groups = [{"params": steps_or_codebooks, "lr": self.lr}] + (
            [{"params": zeros, "lr": self.zero_lr}] if zeros else []
        )
        lr_at = warmup_cosine_schedule(self.warmup_ratio)
        generator = torch.Generator().manual_seed(self.seed)
        try:
            losses, best = train_end_to_end(
                context,
                groups,
                name=self.name,
                epochs=self.epochs,
                batch_size=self.batch_size,
                micro_batch_size=self.micro_batch_size,
                order=lambda epoch, count: torch.randperm(count, generator=generator),
                objective=self.objective,
                top_k=self.top_k,
                lr_at=lr_at,
                max_grad_norm=self.max_grad_norm,
                heldout=self.heldout,
            )
        finally:
            for module in modules.values():
                for name in ("zeros", "scales"):
                    if parametrize.is_parametrized(module, name):
                        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                if "scales" in module.trained_dtypes and module.trained_dtypes["scales"].itemsize > 1:
                    with torch.no_grad():  # stay positive in the storage dtype (storable_scale's rule)
                        module.scales.clamp_(min=torch.finfo(module.trained_dtypes["scales"]).tiny)
                module.freeze()
        context.record(
            "e2e_qp",
            loss_first_step=losses[0],
            loss_last_step=losses[-1],
            steps=len(losses),
            **(best.summary() if best else {}),
            trainable_parameters=sum(p.numel() for p in steps_or_codebooks + zeros),
            seconds=time.perf_counter() - started,
            **peak_memory(context.device),
        )
