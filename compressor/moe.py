"""Mixture-of-experts blocks: every expert a module of its own, loaded once, called on its routed tokens.

transformers 5 keeps a MoE layer's experts as two fused 3-D parameters (``experts.gate_up_proj``
``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``) and converts the per-expert tensors of the
checkpoint (``experts.{e}.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``)
into them while loading. We never build the fused tensors: when a model is opened, each fused experts
module of the (meta) skeleton is replaced by ``RoutedExperts``, a list of per-expert gated MLPs whose
``nn.Linear`` projections carry the checkpoint's own names. So

* each expert's weights are read from the checkpoint straight into its own linears, once (no fused
  copy, no re-linearized second copy: a MoE block costs what its parameters cost);
* every method that quantizes ``nn.Linear`` layers quantizes experts as they are (per-expert scales,
  per-expert statistics), and a hook on an expert's linear sees exactly the tokens routed to it,
  because ``RoutedExperts.forward`` calls each expert module on its own tokens (no grouped matmul
  bypasses the hooks);
* the export writes the checkpoint's names (``checkpoint_name``), which is what transformers' loader
  converts and what vLLM's fused-MoE loader maps (``experts.{e}.{gate,up,down}_proj`` / ``w1,w3,w2``).

``RoutedExperts.forward`` is transformers' eager loop, expert by expert in ascending order, with the same
dtype handling, so a block runs as the fused one does. Routers (``mlp.gate``: not ``nn.Linear`` in
these families) and Qwen2-MoE's ``shared_expert_gate`` (an ``nn.Linear`` with one output) are never
offered to quantizers (``arch.ExpertLayout.routers``).

Checkpoints that store the experts fused (transformers 5 writes them so with ``save_original_format=False``;
some models ship so): each expert's projection is read as its slice of the fused tensor (``FusedSlice``:
``gate_up_proj[e]``'s first or second half of the rows, ``down_proj[e]``) straight from the mapped file, so
neither the fused tensor nor a second copy of the experts is ever held. A quantized export writes the experts
per expert under the original checkpoint names: compressed-tensors quantizes linears, and vLLM's fused-MoE
loader (``FusedMoE.make_expert_params_mapping``: ``experts.{e}.{gate,up,down}_proj.`` -> ``experts.w13_`` /
``experts.w2_``) and transformers' compressed-tensors loader read exactly those names; a dense export
(``export.format: dense``) of such a checkpoint writes the fused tensors again (``fused_parts``, streamed
expert by expert into the shard), under transformers 5's names, as the input had them.

Calibration (``calibration.expert_calibration``): ``routed`` (default) leaves routing as it is; ``all``
also runs every token through every expert for statistics only (hooks see all tokens; the block's output
still uses the routed tokens, weighted by the router). Either way the session counts the tokens routed to
each expert of each MoE layer, reports them, and names in a warning every expert below
``calibration.min_expert_tokens``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers.activations import ACT2FN


class Expert(nn.Module):
    """One expert: a gated MLP ``down(act(gate(x)) * up(x))`` whose linears carry the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: str):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False))
        self.act_fn = ACT2FN[act]

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, name) for name in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts module (same ``forward(hidden, top_k_index, top_k_weights)``),
    holding one ``Expert`` per expert.

    ``census``: when a tensor ``[num_experts]``, each forward adds the number of tokens routed to each
    expert. ``calibrate_all``: each expert also runs on every token (its output for tokens not routed to it
    is dropped), so hooks on its linears see all tokens."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.census: torch.Tensor | None = None
        self.calibrate_all = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        num_experts = len(self)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            if self.census is not None:
                self.census += mask[:num_experts].sum(dim=(-1, -2)).to(self.census)
            hit = range(num_experts) if self.calibrate_all else mask.sum(dim=(-1, -2))[:num_experts].nonzero()[:, 0]
        for index in hit:
            index = int(index)
            top_k_pos, token_idx = torch.where(mask[index])
            if self.calibrate_all:
                out = self[index](hidden_states)[token_idx]
            elif len(token_idx) == 0:
                continue
            else:
                out = self[index](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def unfuse_experts(block: nn.Module, adapter, config) -> nn.Module:
    """Replace the block's fused experts module (if it has one) by ``RoutedExperts`` on the meta device;
    the new linears are materialized from the checkpoint like any other parameter."""
    layout = adapter.experts
    if layout is None or not _has(block, layout.experts):
        return block
    fused = block.get_submodule(layout.experts)
    if isinstance(fused, RoutedExperts):
        return block
    count = getattr(config, layout.num_experts)
    intermediate = getattr(config, layout.intermediate_size)
    with init_empty_weights(include_buffers=False):
        experts = [
            Expert(layout.projections, config.hidden_size, intermediate, config.hidden_act) for _ in range(count)
        ]
        block.set_submodule(layout.experts, RoutedExperts(experts).to(_device_of(fused)))
    return block


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("meta")


def checkpoint_name(adapter, name: str) -> str:
    """The checkpoint's name of the in-memory tensor ``name`` (Mixtral: ``.mlp.`` -> ``.block_sparse_moe.``)."""
    if adapter.experts is None:
        return name
    for ours, theirs in adapter.experts.checkpoint_renames:
        name = name.replace(ours, theirs)
    return name


def model_name(adapter, name: str) -> str:
    """The in-memory name of the checkpoint's tensor ``name`` (the inverse of ``checkpoint_name``)."""
    if adapter.experts is None:
        return name
    for ours, theirs in adapter.experts.checkpoint_renames:
        name = name.replace(theirs, ours)
    return name


FUSED = ("gate_up_proj", "down_proj")  # transformers 5's fused expert tensors: [E, 2I, H] and [E, H, I]


@dataclass(frozen=True)
class FusedSlice:
    """Where one expert projection's weight lies in its layer's fused tensor ``name``: ``gate_up_proj[expert]``'s
    first (``half`` 0: gate) or second (1: up) half of the rows, or ``down_proj[expert]`` whole (``half`` None)."""

    name: str
    expert: int
    half: int | None

    def index(self, shape) -> tuple:
        """The index into the fused tensor of ``shape`` (for ``safe_open(...).get_slice(name)[index]``)."""
        if self.half is None:
            return (self.expert,)
        rows = shape[1] // 2
        return (self.expert, slice(self.half * rows, (self.half + 1) * rows))

    def shape(self, shape) -> tuple[int, int]:
        return (shape[1] // 2 if self.half is not None else shape[1], shape[2])


def fused_slice(adapter, name: str, stored: Container[str]) -> FusedSlice | None:
    """The slice holding the expert weight ``name`` (``...mlp.experts.3.gate_proj.weight``) when the checkpoint
    (its tensor names: ``stored``) keeps the layer's experts fused; None for any other tensor or checkpoint."""
    if adapter is None or adapter.experts is None:
        return None
    layout = adapter.experts
    head, marker, tail = name.rpartition(f".{layout.experts}.")
    parts = tail.split(".")
    if (
        not marker
        or len(parts) != 3
        or not parts[0].isdigit()
        or parts[1:] not in ([p, "weight"] for p in layout.projections)
    ):
        return None
    role = layout.projections.index(parts[1])  # gate, up, down
    fused = f"{head}{marker}{FUSED[1] if role == 2 else FUSED[0]}"
    if fused not in stored:
        return None
    return FusedSlice(fused, int(parts[0]), None if role == 2 else role)


def stores_fused(adapter, stored: Iterable[str]) -> bool:
    """Whether a checkpoint (its tensor names) keeps the experts as transformers 5's fused tensors."""
    layout = adapter.experts if adapter is not None else None
    return layout is not None and any(name.endswith(f".{layout.experts}.{FUSED[0]}") for name in stored)


def fused_parts(experts: RoutedExperts, weight) -> Iterator[tuple[str, tuple[int, ...], Iterator[torch.Tensor]]]:
    """A layer's experts as transformers 5's fused tensors, without building them: (name, shape, the parts whose
    bytes in order are its data): ``gate_up_proj`` [E, 2I, H] (each expert's gate rows, then its up rows) and
    ``down_proj`` [E, H, I]. ``weight(linear)``: a linear's dense weight (a quantized one dequantized)."""
    gate, up, down = experts[0].projections()
    count = len(experts)
    yield (
        FUSED[0],
        (count, gate.out_features + up.out_features, gate.in_features),
        (weight(linear) for expert in experts for linear in expert.projections()[:2]),
    )
    yield FUSED[1], (count, down.out_features, down.in_features), (weight(e.projections()[2]) for e in experts)


def unfuse_model_experts(model: nn.Module, config) -> None:
    """``unfuse_experts`` on every block of a transformers model of a MoE family (no-op for other models)."""
    from compressor.arch import UnsupportedArchitecture, adapter_for

    try:
        adapter = adapter_for(config)
    except UnsupportedArchitecture:
        return None
    if adapter.experts is None:
        return None
    for block in model.get_submodule(adapter.blocks):
        unfuse_experts(block, adapter, config)
    return adapter


def expert_modules(adapter, block: nn.Module) -> RoutedExperts | None:
    if adapter.experts is None or not _has(block, adapter.experts.experts):
        return None
    experts = block.get_submodule(adapter.experts.experts)
    return experts if isinstance(experts, RoutedExperts) else None


@contextmanager
def calibrating(adapter, block: nn.Module, policy: str = "routed"):
    """Count the tokens routed to each expert while the body runs the block (yields the counts tensor,
    or None for a block without experts); with ``policy`` ``all``, every expert also sees every token."""
    experts = expert_modules(adapter, block)
    if experts is None:
        yield None
        return
    experts.census = torch.zeros(len(experts), dtype=torch.long)
    experts.calibrate_all = policy == "all"
    try:
        yield experts.census
    finally:
        experts.census, experts.calibrate_all = None, False


def report_census(report, prefix: str, adapter, counts: torch.Tensor, threshold: int) -> None:
    """One row with the routed tokens of each expert of a layer; a warning naming every expert below ``threshold``."""
    path = f"{prefix}.{adapter.experts.experts}"
    report.add_row(step="calibration", module=path, tokens_per_expert=counts.tolist())
    starved = [str(i) for i, n in enumerate(counts.tolist()) if n < threshold]
    if starved:
        report.warn(
            f"{path}: experts {', '.join(starved)} received fewer than {threshold} calibration tokens "
            f"(tokens per expert: {counts.tolist()}); their statistics are thin. Use more calibration samples, "
            "or calibration.expert_calibration: all"
        )


def check_expert_schemes(report, prefix: str, adapter, block: nn.Module) -> None:
    """Serving engines stack a layer's experts into one fused MoE kernel: every expert projection must share one
    quantization scheme (vLLM: 'All MoE projections need to have same quantization scheme')."""
    from compressor.report import scheme_of

    experts = expert_modules(adapter, block)
    if experts is None:
        return
    schemes = {scheme_of(linear) for expert in experts for linear in expert.projections()}
    if len(schemes) > 1:
        report.warn(
            f"{prefix}.{adapter.experts.experts}: the experts' projections have {len(schemes)} different quantization "
            "schemes (or are partly unquantized); vLLM's fused MoE kernels need one and will refuse the checkpoint"
        )
