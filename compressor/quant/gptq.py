"""GPTQ: second-order (OBS-style) rounding of each linear against its inputs' Hessian, column by column.

Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023, arXiv 2210.17323. Per linear: H = 2/n sum x x^T over its calibration inputs; columns are rounded
in turn onto the RTN grid (``quant/uniform.py``: same ``UniformWeight``, same export) and each rounding
error is spread over the columns not yet quantized through the upper Cholesky factor of H^-1, in blocks
of ``block_size`` columns with lazy batch updates. Hessians are taken true-sequentially inside a block:
(q,k,v), o, (gate,up), down (from the adapter; any other linear after, alone), each group's inputs caught
with the group before it already quantized. Defaults (llm-compressor's): 4 bits, group 128, symmetric,
dampening_frac 0.01 of the mean diagonal, block_size 128, actorder static. Dead inputs (zero diagonal)
get a diagonal of 1 and a zero weight column. ``refit_rounds`` (not in the paper; 0 by default, so the step
is the references' GPTQ): with the codes fixed, each row's group scales that minimise tr(D H D^T) exactly
(least squares, ``refit_rows``), then a new sweep on them; the best state met is kept. The column sweep
(``column_sweep``) takes the rounding as a callback: the integer grid, the float grids and ``lut_gptq.py``'s
codebooks share it. ``bits_per_weight`` (0 by default: off; ``quant/allocation.py``): each serving-fused group
of linears at its own scheme, chosen on the whole model before the pass under that average.
``actorder: static`` quantizes columns by decreasing diag(H) with static groups: every group's scale and
zero are min-max of the original weights' group, computed before the permutation, so groups stay consecutive
columns and g_idx trivial (Marlin serves it).
Where the references differ: with ``actorder: none`` a group's grid is min-max of its weights as they are
when its first column is reached (IST-DASLab's and GPTQModel's code; they miss pending in-block updates when
a group starts mid-block, we include them; llm-compressor fixes all grids up front); per-channel grids come
from the original weights (all three). A Hessian Cholesky refuses is damped 10x, then 100x more
(llm-compressor falls back to RTN, GPTQModel adds 0.0015 steps); the damping used is in the report.

Float grids (``grid: fp8 | fp8-block | nvfp4 | mxfp4``, ``weights/values.py``): the scales are RTN's min-max
ones from the original weights, fixed up front (as llm-compressor does for every grid), and each column is
rounded by the element format's own rounding. W+A (``activation_bits`` or ``activation_grid``, shared with RTN):
each linear's Hessian is taken on its inputs as quantized (``H = 2/n sum Q(x) Q(x)^T``, the inputs the layer
will see) and a group's inputs are quantized before the next group's Hessians are caught. After ``rotate``
this is QuaRot's GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.arch import input_groups
from compressor.blockwise import InputHooks
from compressor.modules.activations import ActivationSpec, quantize_activations
from compressor.quant.allocation import BitAllocation
from compressor.quant.uniform import (
    WEIGHT_GRIDS,
    ActivationQuantization,
    UniformQuantizer,
    calibrate_input_global_scales,
    minmax_params,
    quantize_codes,
    relative_error,
    shared_global_scales,
    storable_scale,
)
from compressor.step import param, register_step
from compressor.weights.values import (
    FloatGrid,
    FloatWeight,
    UniformWeight,
    effective_scales,
    element_codes,
    element_values,
    expand_scales,
    grid_params,
)

if TYPE_CHECKING:
    from compressor.context import BlockContext

ACTORDERS = ("static", "none")
DAMPING_RETRIES = (10.0, 100.0)  # when Cholesky fails: these multiples of dampening_frac (at least 0.001)


# ----------------------------------------------------------------------------------------------
# Hessians: a plain sum of x x^T and a token count (sums of several processes all-reduce as they are)


def add_to_hessian(total: torch.Tensor, x: torch.Tensor) -> int:
    """``total += X^T X`` for the tokens of ``x`` [..., K] (fp32 [K, K], in place); returns how many tokens."""
    x = x.reshape(-1, x.shape[-1]).to(total.dtype)
    total.addmm_(x.t(), x)
    return x.shape[0]


def hessian(total: torch.Tensor, tokens: int) -> torch.Tensor:
    """H = 2/n sum x x^T (the Hessian of the layer's squared output error in its weights)."""
    return total * (2.0 / tokens)


# ----------------------------------------------------------------------------------------------
# The algorithm on one weight matrix


def inverse_cholesky(h: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = H^-1), lambda = frac * mean diag(H); the damping
    is raised (``DAMPING_RETRIES``) while Cholesky fails. Returns U and the fraction used."""
    mean = float(torch.diagonal(h).mean())
    for frac in (dampening_frac, *(max(dampening_frac, 1e-3) * multiple for multiple in DAMPING_RETRIES)):
        damped = h.clone()
        torch.diagonal(damped).add_(frac * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info:
                return upper, frac
    raise ValueError(
        f"dampening_frac: the Hessian is not positive definite even at {frac:g} of its mean diagonal; "
        "raise dampening_frac or calibrate on more tokens"
    )


@dataclass
class GPTQResult:
    weight: UniformWeight
    damping: float  # the dampening fraction used
    loss: float  # sum of (w - q)^2 / (2 [H_F^-1]_qq): 1/2 tr(D (H + lambda I) D^T); refit_rounds: 1/2 tr(D H D^T)


def round_column(
    column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [N, 1] on its rows' grid (scales and zeros [N, 1]): its codes [N] and dequantized values [N],
    by RTN's rounding and ``UniformWeight``'s dequantization."""
    codes = quantize_codes(column, scale, zero, bits, -1)
    return codes[:, 0], UniformWeight(codes, scale, zero, bits, -1).dequantize(torch.float32)[:, 0]


def column_sweep(
    w: torch.Tensor,
    hinv: torch.Tensor,
    block_size: int,
    quantize: Callable[[int, Callable[[int], torch.Tensor]], torch.Tensor],
) -> float:
    """GPTQ's column loop, whatever the grid: columns of ``w`` [N, K] (already in the solve order; modified in
    place) are quantized left to right by ``quantize(column, upcoming)``, which returns the column's quantized
    values [N]; ``upcoming(end)`` gives the columns ``column..end`` [N, end - column] as they are now, every
    earlier rounding error already spread over them (lazy in-block updates included). Each error goes to the
    later columns through ``hinv``, the upper Cholesky factor of H^-1, in blocks of ``block_size`` columns.
    Returns the loss: the per-column (w - q)^2 / (2 [H_F^-1]_qq) summed."""
    k = w.shape[1]
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            column = i1 + i

            def upcoming(end: int) -> torch.Tensor:
                current = block[:, i : min(end, i2) - i1]
                if end > i2:  # past this block: those columns with the updates still pending
                    current = torch.cat([current, w[:, i2:end] - errors[:, :i] @ hinv[i1:column, i2:end]], dim=1)
                return current

            q = quantize(column, upcoming)
            error = (block[:, i] - q) / hinv1[i, i]
            loss += error.square().sum() / 2
            block[:, i:] -= error[:, None] * hinv1[i, i:][None, :]
            errors[:, i] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return float(loss)


def solve_order(w: torch.Tensor, h: torch.Tensor, actorder: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, w, h) in the solve order: by decreasing diag(H) for ``actorder: static``, else as stored."""
    if actorder != "static":
        return torch.arange(w.shape[1], device=w.device), w, h
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    return order, w[:, order], h[order][:, order]


def prepare(weight: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of the weight and Hessian; dead inputs (zero diagonal) get a diagonal of 1 and a zero column."""
    w = weight.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: str = "static",
    grid: FloatGrid | None = None,
    global_scale: torch.Tensor | None = None,
    refit_rounds: int = 0,
) -> GPTQResult:
    """GPTQ of ``weight`` [N, K] given its inputs' Hessian ``h`` [K, K] (``hessian``): a ``UniformWeight``
    on RTN's grid whose groups are consecutive columns (the trivial g_idx) whatever the column order. With a
    float ``grid`` (``weights/values.py``; ``bits``, ``group_size`` and ``symmetric`` unused) a ``FloatWeight``
    whose scales are RTN's, fixed from the original weights up front whatever ``actorder`` (NVFP4: under
    ``global_scale`` when given, one shared by fused shards). ``refit_rounds`` (static grids only): least-squares
    scales for the codes, then a new sweep, that many times (``refit_scales``)."""
    if refit_rounds and group_size != -1 and actorder == "none":
        raise ValueError("refit_rounds: needs grids fixed up front (actorder static, or group_size -1)")
    w, h = prepare(weight, h)
    n, k = w.shape
    if grid is not None:
        return gptq_float(w, h, grid, scale_dtype, block_size, dampening_frac, actorder, global_scale)
    lazy = group_size != -1 and actorder == "none"
    if not lazy:  # per channel, or static groups: min-max of the original weights
        scales, zeros = minmax_params(w, bits, group_size, symmetric, scale_dtype)
    else:  # filled group by group as the columns are reached
        groups = k // group_size + bool(k % group_size)
        scales = torch.empty(n, groups, dtype=scale_dtype, device=w.device)
        zeros = None if symmetric else torch.empty(n, groups, dtype=torch.int32, device=w.device)
    order, w, h = solve_order(w, h, actorder)
    group_of = [0] * k if group_size == -1 else (order // group_size).tolist()
    hinv, damping = inverse_cholesky(h, dampening_frac)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)

    def quantize(column: int, upcoming) -> torch.Tensor:
        g = group_of[column]
        if lazy and column % group_size == 0:  # the group's grid from its columns as they are now
            scale, zero = minmax_params(upcoming(min(column + group_size, k)), bits, -1, symmetric, scale_dtype)
            scales[:, g : g + 1] = scale
            if zeros is not None:
                zeros[:, g : g + 1] = zero
        zero = None if zeros is None else zeros[:, g : g + 1]
        codes[:, column], q = round_column(upcoming(column + 1), scales[:, g : g + 1], zero, bits)
        return q

    loss = column_sweep(w.clone(), hinv, block_size, quantize)
    if refit_rounds:
        group = torch.tensor(group_of, device=w.device).expand(n, k)
        zero_points = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
        sweep = lambda: column_sweep(w.clone(), hinv, block_size, quantize)  # noqa: E731
        codes, scales, loss = refit_scales(w, h, hinv, codes, scales, zero_points, group, refit_rounds, sweep)
    codes = codes[:, torch.argsort(order)]
    return GPTQResult(UniformWeight(codes, scales, zeros, bits, group_size), damping, loss)


def refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    hinv: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    group: torch.Tensor,
    rounds: int,
    sweep: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``refit_rounds``: the scales (zeros and codes fixed) that minimise the output error of the codes the sweep
    chose (``refit_rows``), then a new sweep on them (``sweep()`` re-rounds ``codes`` in place on ``scales``),
    ``rounds`` times. Returns the (codes, scales) with the lowest ``tr(D H D^T)`` met, and half of it (the
    sweep's loss). ``w``, ``h``, ``codes`` and ``group`` (each column's group [N, K]) are in the solve order;
    ``zero_points`` [N, G] (float)."""
    levels = lambda: codes.float() - zero_points.gather(1, group)  # noqa: E731

    def error() -> float:
        return weighted_output_error(w, levels() * scales.float().gather(1, group), h)

    best = (error(), codes.clone(), scales.clone())
    for _ in range(rounds):
        fitted = refit_rows(w, h, group, levels(), scales.float())
        scales.copy_(storable_scale(torch.where(fitted > 0, fitted, scales.float()), scales.dtype))
        for rounded in (False, True):
            if rounded:
                sweep()
            if (current := error()) < best[0]:
                best = (current, codes.clone(), scales.clone())
    scales.copy_(best[2])
    return best[1], scales, best[0] / 2


def refit_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    index: torch.Tensor,
    coefficient: torch.Tensor,
    current: torch.Tensor,
    chunk: int = 16,
) -> torch.Tensor:
    """Per row n, the values theta [P] minimising ``(w - q)^T H (w - q)`` for ``q_k = coefficient[n, k] *
    theta[index[n, k]]`` (``index`` [N, K] int64 in [0, P), ``current`` [N, P]): the normal equations
    ``(B^T H B) theta = B^T H w`` of the basis ``B[k, p] = coefficient_k [index_k = p]``. Codebook centroids
    (coefficient 1, index the code) and group scales (coefficient code - zero, index the group) are both
    linear in their values this way. A value no column uses (or only with coefficient 0) keeps ``current``."""
    n, p = current.shape
    h = h.double()
    out = torch.empty_like(current)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        basis = torch.nn.functional.one_hot(index[rows], p).double() * coefficient[rows, :, None].double()  # [r, K, P]
        gram = basis.transpose(1, 2) @ (h @ basis)
        rhs = (basis.transpose(1, 2) @ (h @ w[rows].double().T).T[..., None])[..., 0]
        used = torch.diagonal(gram, dim1=1, dim2=2) > 0
        gram = gram * (used[:, :, None] & used[:, None, :]) + torch.diag_embed((~used).double())
        rhs = torch.where(used, rhs, current[rows].double())
        out[rows] = torch.linalg.solve(gram, rhs[..., None])[..., 0].to(out.dtype)
    return out


def weighted_output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's squared output error on its calibration inputs (times 2/n)."""
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


def gptq_float(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: FloatGrid,
    scale_dtype: torch.dtype,
    block_size: int,
    dampening_frac: float,
    actorder: str,
    global_scale: torch.Tensor | None = None,
) -> GPTQResult:
    """``gptq_quantize`` on a float grid (dead columns already zeroed): every weight's scale is fixed first,
    so a column is rounded with the elements' own rounding (``floats.element_codes``) on its rows' scales."""
    n, k = w.shape
    scales, global_scale = grid_params(grid, w, scale_dtype, global_scale=global_scale)
    scale = expand_scales(effective_scales(grid, scales, global_scale), grid, n, k)
    order, w, h = solve_order(w, h, actorder)
    scale = scale[:, order]
    hinv, damping = inverse_cholesky(h, dampening_frac)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)

    def quantize(column: int, upcoming) -> torch.Tensor:
        codes[:, column] = element_codes(grid, upcoming(column + 1)[:, 0] / scale[:, column])
        return element_values(grid, codes[:, column]) * scale[:, column]

    loss = column_sweep(w, hinv, block_size, quantize)
    codes = codes[:, torch.argsort(order)]
    return GPTQResult(FloatWeight(codes, scales, global_scale, grid.name), damping, loss)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> float:
    """||X (W - Q)^T|| / ||X W^T|| from the Hessian alone (tr(D H D^T) / tr(W H W^T))."""
    diff, weight = (weight.float() - quantized.float()), weight.float()
    return float(((diff @ h) * diff).sum() / ((weight @ h) * weight).sum().clamp(min=1e-30)) ** 0.5


# ----------------------------------------------------------------------------------------------
# True-sequential Hessians inside a block


def sequential_groups(adapter, linears: dict) -> list[list[str]]:
    """The linears of ``linears`` (paths in the block) in the order their Hessians are taken: the adapter's
    projections in its order, those reading one input together ((q,k,v), o, (gate,up), down for Llama; a
    norm's readers or a group reading the residual stream, ``arch.input_groups``), then every other linear
    alone, in block order."""
    together = {path: group for group in input_groups(adapter) for path in group}
    groups, placed = [], set()
    for path in adapter.linears.values():
        if path in placed:
            continue
        members = together.get(path, (path,))
        placed.update(members)
        group = [member for member in members if member in linears]
        if group:
            groups.append(group)
    return groups + [[path] for path in linears if path not in placed]


def sequential_hessians(context: BlockContext, linears: dict, true_sequential: bool = True, input_spec=None):
    """(names, catcher) for each group of ``linears`` (``sequential_groups``; all at once without
    ``true_sequential``) after one forward of the block, so a group's Hessians see the block as the caller left it
    after the groups yielded before (GPTQ quantizes them in between; Block-AP's GPTQ init rounds them in place).
    ``input_spec`` (W+A) makes the Hessians those of the inputs as quantized; a static NVFP4 ``input_spec``
    (``activation_global_scale: calibrated``) quantizes them under each linear's calibrated input global scale,
    taken first from the block as it is then (what ``quantize_block_activations`` attaches after)."""
    groups = sequential_groups(context.adapter, linears) if true_sequential else [list(linears)]
    static = input_spec is not None and input_spec.static_global_scale
    for names in groups:
        global_scales = calibrate_input_global_scales(context, names) if static else {}
        with torch.no_grad(), HessianCatcher(context.block, names, input_spec, global_scales) as catcher:
            context.forward()
        yield names, catcher


class HessianCatcher(InputHooks):
    """Adds each linear's inputs to its Hessian sum while the block runs."""

    def __init__(
        self,
        block: nn.Module,
        names: list[str],
        input_spec: ActivationSpec | None = None,
        global_scales: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(block, names)
        self.input_spec = input_spec  # inputs seen through ``input_spec``
        self.global_scales = global_scales or {}  # static NVFP4: each linear's calibrated input global scale
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def catch(self, name: str, x: torch.Tensor) -> None:
        x = quantize_activations(x, self.input_spec, self.global_scales.get(name))
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            self.tokens[name] = 0
        self.tokens[name] += add_to_hessian(self.sums[name], x)

    def hessian(self, name: str) -> torch.Tensor | None:
        """H of linear ``name``; None when it saw no token."""
        tokens = int(self.tokens.get(name, 0))
        return hessian(self.sums[name], tokens) if tokens else None

    def statistics(self, name: str, linear: nn.Linear) -> list[torch.Tensor]:
        """The sums other processes add to (``Distributed.solve_owned``): x x^T and the token count, zeros when
        this process's tokens never reached the linear."""
        if name not in self.sums:
            k, device = linear.in_features, linear.weight.device
            self.sums[name] = torch.zeros(k, k, dtype=torch.float32, device=device)
        if not torch.is_tensor(self.tokens.get(name)):
            self.tokens[name] = torch.tensor(
                float(self.tokens.get(name, 0)), dtype=torch.float64, device=self.sums[name].device
            )
        return [self.sums[name], self.tokens[name]]


def solve_cost(linear: nn.Linear) -> float:
    """About the work of one GPTQ solve: the Cholesky factorizations (K^3) and the column sweep (N K^2)."""
    k, n = linear.in_features, linear.out_features
    return float(k**3 + n * k * k)


@register_step("gptq")
@dataclass
class GPTQ(ActivationQuantization, BitAllocation, UniformQuantizer):
    """GPTQ: Hessian-aware rounding of every block linear onto RTN's grid (Frantar et al. 2022)."""

    distributes = "sums"  # the Hessian sums of all processes meet at each linear's owner, which solves
    grids = WEIGHT_GRIDS

    block_size: int = param(
        128, "columns per lazy batch update (speed only: the result is the same up to float rounding)", min=1
    )
    dampening_frac: float = param(0.01, "added to the Hessian's diagonal, as a fraction of its mean", min=0.0, max=1.0)
    actorder: str = param(
        "static",
        "column order: by decreasing Hessian diagonal with static groups (g_idx stays trivial), or as stored",
        choices=ACTORDERS,
    )
    refit_rounds: int = param(
        0,
        "rounds of least-squares scales for the chosen codes (zeros fixed) then a new sweep; the best state is kept "
        "(static grids)",
        min=0,
    )
    true_sequential: bool = param(
        True, "take each group's Hessian with the earlier groups of the block already quantized (false: all at once)"
    )

    def check(self) -> None:
        super().check()
        if self.refit_rounds and (self.float_grid is not None or (self.group_size != -1 and self.actorder == "none")):
            raise ValueError("refit_rounds: needs an int grid fixed up front (actorder static, or group_size -1)")

    def check_model(self, linears: dict) -> None:
        super().check_model(linears)
        self.check_budget(linears)

    def candidate_weight(self, weight: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, scale_dtype):
        """GPTQ with this step's settings at another (bits, group_size): what bit allocation scores."""
        return gptq_quantize(
            weight,
            h,
            bits,
            group_size,
            self.symmetric,
            scale_dtype,
            self.block_size,
            self.dampening_frac,
            self.actorder,
            refit_rounds=self.refit_rounds,
        ).weight

    def compress_block(self, context: BlockContext) -> None:
        self.refuse_other_weight_kinds(context)
        linears = context.linears(self.ignore)
        global_scales = shared_global_scales(context.adapter, linears, self.float_grid)  # NVFP4's fused shards
        for names, catcher in sequential_hessians(context, linears, self.true_sequential, self.activation_spec):
            # several processes: each linear's Hessian sum is reduced to its owner, which solves (distributed.py)
            context.run.distributed.solve_owned(
                {name: catcher.statistics(name, linears[name]) for name in names},
                {name: solve_cost(linears[name]) for name in names},
                lambda name: self.quantize_linear(
                    context, name, linears[name], catcher.hessian(name), global_scales.get(name)
                ),
                context.run.report,
                context.prefix,
                context.device,
                install=context.replace_linear,
            )
            # later groups' Hessians see these inputs quantized
            self.quantize_block_activations(context, {name: context.block.get_submodule(name) for name in names})

    def round_linear(
        self,
        context: BlockContext,
        name: str,
        weight: torch.Tensor,
        h: torch.Tensor | None,
        global_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GPTQResult]:
        """GPTQ of one weight with this step's settings: the Hessian used (I, i.e. RTN, for a linear that saw no
        token) and the result."""
        if h is None:  # never called on the calibration data: H = I, which makes GPTQ RTN
            context.run.report.warn(f"gptq: {context.prefix}.{name} saw no calibration token; rounded to nearest")
            h = torch.eye(weight.shape[1], device=weight.device)
        bits, group_size = self.scheme_for(context.state, f"{context.prefix}.{name}")
        return h, gptq_quantize(
            weight,
            h,
            bits,
            group_size,
            self.symmetric,
            context.scale_dtype,
            self.block_size,
            self.dampening_frac,
            self.actorder,
            self.float_grid,
            global_scale,
            self.refit_rounds,
        )

    def quantize_linear(
        self,
        context: BlockContext,
        name: str,
        linear: nn.Linear,
        h: torch.Tensor | None,
        global_scale: torch.Tensor | None = None,
    ) -> UniformWeight:
        weight = linear.weight.data
        h, result = self.round_linear(context, name, weight, h, global_scale)
        rtn = self.round_to_nearest(
            weight, context.scale_dtype, global_scale, self.scheme_for(context.state, f"{context.prefix}.{name}")
        )
        context.record(
            name,
            error=relative_error(weight, result.weight),
            output_error=output_error(weight, result.weight.dequantize(torch.float32), h),
            rtn_output_error=output_error(weight, rtn.dequantize(torch.float32), h),
            damping=result.damping,
            bits_per_weight=result.weight.bits_per_weight(),
        )
        return result.weight
