"""Bit allocation: each group of linears a serving engine fuses gets its own uniform scheme (bits, group size)
under an average bits-per-weight budget, chosen to minimise the model's estimated KL from the original.

Where it comes from: mixed precision by a second-order sensitivity is HAWQ's idea (Dong et al., "HAWQ-V2:
Hessian Aware trace-Weighted Quantization of Neural Networks", NeurIPS 2020, arXiv 1911.03852: a Hessian
trace per layer, a bit budget) and what ModelOpt's ``auto_quantize`` and AutoRound's ``AutoScheme`` ship
for LLMs (a per-layer format search under an effective-bits constraint, scored by a gradient-weighted
output error). Ours scores each candidate by the quantizer's own result, not a proxy rounding:

    KL(p_original || p_quantized) per token  ~=  1/2 sum_j F_j E[dy_j^2]

for a perturbation ``dy`` of one linear's output, where ``F_j`` is the Fisher information of output channel
``j`` (the mean over tokens of the squared gradient of the next-token loss at that output; the diagonal of
the KL's Hessian, with the true next tokens: the empirical Fisher, as SqueezeLLM takes it) and
``E[dy_j^2] = (D H D^T)_jj / tokens`` with ``D = Q - W`` the candidate's weight error and ``H = sum x x^T``
the linear's input Hessian: the very error GPTQ minimises, weighted per output channel by how much the
model's prediction depends on it. Each candidate (``schemes``, plus the step's own ``bits``/``group_size``)
is solved by the step itself (GPTQ with its settings, or RTN) on the original model's inputs, so the estimate
sees GPTQ's error, which differs from RTN's by a factor of 2 to 150 from layer to layer on our models. An
expert sees only the tokens routed to it: its Fisher and Hessian sums run over those, ``T_e`` tokens.
Defaults: ``bits_per_weight`` 0 (off); ``schemes`` w2g128, w2g64, w3g128, w3g64, w4g128, w4g64, w8g128 (group
sizes every serving kernel takes; 5-7 bits left out: no engine serves them).
Measured on two trained models (benchmarks/results/beat-gptq/): per-group estimates within 0.5-1.2x of
the KL measured by quantizing that group alone, log-correlation 0.997, and the KLs add up (sum of the
groups alone = the whole model quantized, within 1 %).

The budget is a multiple-choice knapsack: every unit (q/k/v together, gate/up together, o, down, all
experts of a layer together: what vLLM fuses and so must share a scheme) takes one scheme; the total bits
(codes, fp16 scales, packed zero points: ``UniformWeight.bits_per_weight``) stay within ``bits_per_weight``
times the weights. Solved by dynamic programming over the budget in 20000+ steps (``choose``; a greedy by
KL saved per bit missed the optimum on 10 % of small random instances, by up to 2.4x). Costs two passes over
the calibration before the step's own (a forward and backward for the Fisher, a forward for the Hessians)
and one GPTQ solve per candidate per linear.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.blockwise import InputHooks, run_block, weight_gradients
from compressor.moe import calibrating
from compressor.step import Step, param
from compressor.weights.values import SCALE_BITS, num_groups

if TYPE_CHECKING:
    from compressor.context import ModelContext

SCHEME_PATTERN = re.compile(r"^w([2-8])(?:g(\d+))?$")


def parse_scheme(text: str) -> tuple[int, int]:
    """``w4g128`` -> (4, 128); ``w8`` -> (8, -1), one scale per output row."""
    match = SCHEME_PATTERN.match(text)
    if match is None:
        raise ValueError(f"schemes: {text!r} is not w<bits>g<group_size> (bits 2..8) or w<bits> (per channel)")
    bits, group = match.groups()
    if group is not None and int(group) < 1:
        raise ValueError(f"schemes: {text!r} has a group size below 1")
    return int(bits), -1 if group is None else int(group)


def scheme_name(bits: int, group_size: int) -> str:
    return f"w{bits}" if group_size == -1 else f"w{bits}g{group_size}"


def scheme_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> float:
    """Bits one ``[out, in]`` weight takes in a scheme: codes, fp16 scales and (asymmetric) packed zero points,
    as ``UniformWeight.bits_per_weight`` counts them, times the weights."""
    metadata = num_groups(in_features, group_size) * out_features * (SCALE_BITS + (0 if symmetric else bits))
    return bits * out_features * in_features + metadata


def fits(in_features: int, group_size: int) -> bool:
    return group_size == -1 or in_features % group_size == 0


# ----------------------------------------------------------------------------------------------
# Units: what must share one scheme


def unit_of(adapter, path: str) -> str:
    """The unit (its name in the block) of a linear: its serving-fused group (``adapter.fused_groups``: q/k/v ->
    ``self_attn.q_proj+k_proj+v_proj``), the experts module for any expert projection, else the linear itself."""
    if adapter.experts is not None and path.startswith(adapter.experts.experts + "."):
        return adapter.experts.experts
    for group in adapter.fused_groups:
        paths = [adapter.linears[role] for role in group if role in adapter.linears]
        if path in paths:
            parents = {p.rpartition(".")[0] for p in paths}
            if len(parents) == 1:  # one module holds them all: name it once
                return f"{parents.pop()}.{'+'.join(p.rpartition('.')[2] for p in paths)}".lstrip(".")
            return "+".join(paths)
    return path


# ----------------------------------------------------------------------------------------------
# Statistics: the Fisher of each linear's outputs, the Hessian of its inputs


def output_fisher(context: ModelContext, linears: dict[str, nn.Linear], batch_size: int) -> dict[str, torch.Tensor]:
    """``sum over tokens of (d loss / d y_j)^2`` per output channel ``j`` of each linear (fp32 [out] on the CPU),
    ``loss`` the sum of the next-token losses of each sequence (so every position's gradient is that of its
    sequence's loss). Gradients arrive block by block (``context.forward_backward``); weight gradients are
    dropped as they come."""
    sums = {name: torch.zeros(linear.out_features) for name, linear in linears.items()}

    def watch(name):
        def hook(module, args, output):
            if output.requires_grad:  # the recomputation with autograd (not the first, gradient-free forward)
                output.register_hook(lambda g: add_squares(sums[name], g))

        return hook

    def add_squares(total, grad):  # returns None: the gradient flows on unchanged
        total.add_(grad.detach().float().square().flatten(0, -2).sum(0).cpu())

    def summed_loss(logits, input_ids):
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
        )

    handles = [linear.register_forward_hook(watch(name)) for name, linear in linears.items()]
    try:
        with weight_gradients(linears):  # the backward reaches every block; weight gradients dropped as they come
            tokens = context.calibration_tokens()
            with context.progress(len(tokens), "output Fisher", "sequence") as progress:
                for batch in tokens.split(batch_size):
                    context.forward_backward(batch, summed_loss)
                    progress.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    for total in sums.values():
        context.run.distributed.all_reduce_sum(total)
    return sums


class HessianSums(InputHooks):
    """``sum x x^T`` and the token count of each named linear's inputs while the block runs."""

    def __init__(self, block: nn.Module, names: list[str]):
        super().__init__(block, names)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}

    def catch(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.tokens[name] = torch.zeros((), dtype=torch.float64, device=x.device)
        self.sums[name].addmm_(x.t(), x)
        self.tokens[name] += len(x)

    def statistics(self, name: str, linear: nn.Linear) -> list[torch.Tensor]:
        """The sums other processes add to, zeros where this process's tokens never reached the linear."""
        if name not in self.sums:
            k = linear.in_features
            self.sums[name] = torch.zeros(k, k, device=linear.weight.device)
            self.tokens[name] = torch.zeros((), dtype=torch.float64, device=linear.weight.device)
        return [self.sums[name], self.tokens[name]]


# ----------------------------------------------------------------------------------------------
# The knapsack


def choose(units: dict[str, list[tuple[float, float]]], budget: float, resolution: int = 0) -> dict[str, int]:
    """One choice per unit (an index into its [(bits, cost)] list) with total bits <= ``budget`` and the least total
    cost: dynamic programming over the budget cut into ``resolution`` steps (default: 100 per unit, at least
    20000), each choice's bits rounded up to whole steps (so the answer is never over budget, and at least as
    good as the exact optimum at a budget smaller by one step per unit), then the bits the rounding left spent on
    the single upgrades that save the most, while any fits."""
    names = list(units)
    resolution = resolution or max(20000, 100 * len(names))
    step = budget / resolution
    best = torch.full((resolution + 1,), math.inf, dtype=torch.float64)  # least cost of exactly b steps so far
    best[0] = 0.0
    widths, picks = {}, []
    for unit in names:
        widths[unit] = [math.ceil(bits / step - 1e-9) for bits, _ in units[unit]]
        now = torch.full_like(best, math.inf)
        pick = torch.full((resolution + 1,), -1, dtype=torch.int16)
        for index, ((_, cost), width) in enumerate(zip(units[unit], widths[unit])):
            if width > resolution:
                continue
            candidate = torch.full_like(best, math.inf)
            candidate[width:] = best[: resolution + 1 - width] + cost
            better = candidate < now
            now[better], pick[better] = candidate[better], index
        best = now
        picks.append(pick)
    if not math.isfinite(float(best.min())):
        cheapest = sum(min(bits for bits, _ in choices) for choices in units.values())
        raise ValueError(f"the budget {budget:.6g} bits is below the cheapest choice {cheapest:.6g} bits")
    at = int(best.argmin())
    chosen = {}
    for unit, pick in zip(reversed(names), reversed(picks)):
        chosen[unit] = int(pick[at])
        at -= widths[unit][chosen[unit]]
    spent = sum(units[unit][i][0] for unit, i in chosen.items())
    while True:  # the rounding's leftover: the single upgrade that saves the most and fits, repeated
        upgrade = None
        for unit, choices in units.items():
            now_bits, now_cost = choices[chosen[unit]]
            for index, (bits, cost) in enumerate(choices):
                if cost < now_cost and spent + bits - now_bits <= budget:
                    if upgrade is None or now_cost - cost > upgrade[0]:
                        upgrade = (now_cost - cost, unit, index, bits - now_bits)
        if upgrade is None:
            return chosen
        _, unit, index, extra = upgrade
        chosen[unit], spent = index, spent + extra


# ----------------------------------------------------------------------------------------------
# The recipe keys and the preparation pass (a base of the quantizer steps that take them: GPTQ)


@dataclass
class BitAllocation(Step):
    """The keys of a quantizer that spreads its bits unevenly (``bits_per_weight``), and the model-wide pass that
    chooses each linear's scheme before its layer pass. Not registered: a uniform quantizer lists it among its
    bases and implements ``candidate_weight``."""

    bits_per_weight: float = param(
        0.0,
        "average bits per weight (codes, scales, zero points) to spread over the quantized linears, each serving-"
        "fused group (q/k/v, gate/up, a layer's experts) taking the scheme of `schemes` (or bits/group_size) that "
        "lowers the estimated KL most; 0: every linear takes bits/group_size",
        min=0.0,
    )
    schemes: list[str] = param(
        ["w2g128", "w2g64", "w3g128", "w3g64", "w4g128", "w4g64", "w8g128"],
        "the schemes bits_per_weight chooses from, w<bits>g<group_size> or w<bits> (per channel), besides "
        "bits/group_size; those whose group size does not divide a linear's input width are skipped for it",
    )

    @property
    def allocates(self) -> bool:
        return self.bits_per_weight > 0

    @property
    def prepares_model(self) -> bool:
        """Whether the session runs ``prepare_model`` on the whole model before this step's layer pass."""
        return self.allocates

    def check(self) -> None:
        super().check()
        if not self.allocates:
            return
        for text in self.schemes:
            parse_scheme(text)
        if getattr(self, "float_grid", None) is not None:
            raise ValueError(f"bits_per_weight: allocates integer schemes; grid {self.grid} fixes its own")

    def candidate_schemes(self, in_features: int) -> list[tuple[int, int]]:
        """The step's own scheme, then every listed one that fits a linear of this input width (no repeats)."""
        own = (self.bits, self.group_size)
        candidates = [own] + [parse_scheme(text) for text in self.schemes]
        return [s for s in dict.fromkeys(candidates) if fits(in_features, s[1])]

    def check_budget(self, linears: dict) -> None:
        """Refuse, before any work, a budget below every linear at its cheapest candidate."""
        if not self.allocates or not linears:
            return
        cheapest = total = 0.0
        for linear in linears.values():
            n, k = linear.out_features, linear.in_features
            cheapest += min(scheme_bits(n, k, b, g, self.symmetric) for b, g in self.candidate_schemes(k))
            total += n * k
        if cheapest > self.bits_per_weight * total * (1 + 1e-12):
            raise ValueError(
                f"bits_per_weight: {self.bits_per_weight} is below the cheapest choice of schemes, "
                f"{cheapest / total:.4f} bits per weight; raise it or add a cheaper scheme"
            )

    def scheme_for(self, state: dict, name: str) -> tuple[int, int]:
        """(bits, group_size) of linear ``name`` (full module name): the allocation's, else the step's own."""
        return tuple(state.get("schemes", {}).get(name, (self.bits, self.group_size)))

    def candidate_weight(self, weight: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, scale_dtype):
        """The step's quantized ``weight`` at (bits, group_size) given its inputs' Hessian ``h`` (2/n sum x x^T)."""
        raise NotImplementedError

    def prepare_model(self, context: ModelContext) -> None:
        """Choose every linear's scheme (``state["schemes"]``: full name -> (bits, group_size)), with a report row
        per unit: its scheme, bits per weight and estimated KL."""
        linears = context.linears(self.ignore)
        tokens = context.calibration_tokens()
        batch_size = max(1, min(8, len(tokens)))
        fisher = output_fisher(context, linears, batch_size)
        total_tokens = context.run.distributed.all_reduce_sum(torch.tensor(float(tokens.numel()), dtype=torch.float64))
        costs = self.candidate_costs(context, linears, fisher, float(total_tokens), batch_size)
        units: dict[str, list[str]] = {}
        for index in range(context.num_blocks):
            prefix = context.handle.block_prefix(index)
            for name in context.linears(self.ignore, index):
                path = name[len(prefix) + 1 :]
                units.setdefault(f"{prefix}.{unit_of(context.adapter, path)}", []).append(name)
        options: dict[str, list[tuple[int, int]]] = {}
        for unit, names in units.items():  # the schemes every member can take, with the unit's bits and cost
            shared = [s for s in costs[names[0]] if all(s in costs[n] for n in names)]
            options[unit] = shared

        def bits_of(names, scheme):
            return sum(scheme_bits(*linears[n].weight.shape, *scheme, self.symmetric) for n in names)

        table = {  # unit -> [(bits, estimated KL)] of its options
            unit: [(bits_of(names, s), sum(costs[n][s] for n in names)) for s in options[unit]]
            for unit, names in units.items()
        }
        weights = sum(linear.weight.numel() for linear in linears.values())
        chosen = choose(table, self.bits_per_weight * weights)
        own = {unit: options[unit].index((self.bits, self.group_size)) for unit in units}  # (check_model: fits all)
        schemes = {}
        for unit, names in units.items():
            scheme = options[unit][chosen[unit]]
            schemes.update({name: scheme for name in names})
            bits, cost = table[unit][chosen[unit]]
            numel = sum(linears[n].weight.numel() for n in names)
            context.run.report.add_row(  # its own step name: the report's table shows units apart from the linears
                step=f"{self.name} allocation",
                module=unit,
                scheme=scheme_name(*scheme),
                bits_per_weight=bits / numel,
                estimated_kl=cost,
            )
        context.state["schemes"] = schemes
        spent = sum(table[u][chosen[u]][0] for u in units)
        estimated = sum(table[u][chosen[u]][1] for u in units)
        uniform = sum(table[u][own[u]][1] for u in units)
        context.run.report.summary[f"{self.name}_allocation"] = {
            "bits_per_weight": round(spent / weights, 4),
            "estimated_kl": estimated,
            f"estimated_kl_{scheme_name(self.bits, self.group_size)}_everywhere": uniform,
        }

    def candidate_costs(
        self, context: ModelContext, linears: dict, fisher: dict, total_tokens: float, batch_size: int
    ) -> dict[str, dict[tuple[int, int], float]]:
        """Estimated KL of each linear at each candidate scheme: one forward of the original model, block by
        block, with each block's Hessians reduced to an owner that solves every candidate."""
        runner, adapter = context.runner, context.adapter
        hidden, kwargs = [], []
        for batch in context.calibration_tokens().split(batch_size):
            first, block_kwargs = runner.first_block_inputs(batch)
            hidden.append(first)
            kwargs.append(block_kwargs)
        costs = {}
        with context.progress(context.num_blocks, "candidate schemes", "block") as progress:
            for index in range(context.num_blocks):
                prefix = context.handle.block_prefix(index)
                names = {name[len(prefix) + 1 :]: name for name in context.linears(self.ignore, index)}
                with runner.resident(index) as block:
                    with calibrating(adapter, block), HessianSums(block, list(names)) as sums:
                        outputs = run_block(block, hidden, [kw[index] for kw in kwargs])
                    solved = context.run.distributed.solve_owned(
                        {path: sums.statistics(path, linears[name]) for path, name in names.items()},
                        {path: len(self.candidate_schemes(linears[name].in_features)) for path, name in names.items()},
                        lambda path: self.linear_costs(
                            linears[names[path]], sums, path, fisher[names[path]], total_tokens, context.scale_dtype
                        ),
                    )
                costs.update({names[path]: value for path, value in solved.items()})
                hidden = outputs
                progress.update()
        return costs

    def linear_costs(
        self, linear: nn.Linear, sums: HessianSums, path: str, fisher: torch.Tensor, total_tokens: float, scale_dtype
    ) -> dict[tuple[int, int], float]:
        """{scheme: 1/2 sum_j F_j (D H D^T)_jj / (T T_e)} for one linear, F its output Fisher sums over all T
        tokens and H its input sums over the T_e tokens it saw (T_e = T but for experts)."""
        h_sum, seen = sums.sums[path], float(sums.tokens[path])
        weight = linear.weight.data.float()
        if seen == 0:  # never reached: no estimate, every scheme costs nothing measurable
            return dict.fromkeys(self.candidate_schemes(linear.in_features), 0.0)
        h = 2 * h_sum / seen
        result = {}
        for bits, group_size in self.candidate_schemes(linear.in_features):
            quantized = self.candidate_weight(weight, h, bits, group_size, scale_dtype).dequantize(torch.float32)
            error = quantized.to(h_sum.device) - weight
            per_channel = ((error @ h_sum) * error).sum(1).cpu()
            result[(bits, group_size)] = 0.5 * float((fisher * per_channel).sum()) / (total_tokens * seen)
        return result
