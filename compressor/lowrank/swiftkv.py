"""SwiftKV: SingleInputKV + AcrossKV + knowledge-preserving self-distillation.

Paper: Qiao, Yao, Rajbhandari, He, "SwiftKV: Fast Prefill-Optimized Inference with Knowledge-Preserving
Model Transformation", arXiv 2410.03960; official training code snowflakedb/ArcticTraining
``projects/swiftkv``, serving plugin snowflakedb/ArcticInference. A model step: the keys and values of
every layer ``l >= M`` (``num_key_value_layers``) come from ``s = norm_swiftkv(h_M)``, the stream
entering layer M, through new ``k/v_proj_swiftkv`` (one per group of ``key_value_group_size`` = G
layers: AcrossKV), and each upper layer gets a new ``q_proj_swiftkv``; only those and ``norm_swiftkv``
train, towards the unchanged original. Prefill then runs the upper layers only for the tokens whose
output is needed (``arch/swiftkv/modeling_llama_swiftkv.py``, shipped with the export in the released layout).

Defaults (official ``llama-3.1-swiftkv-8b-instruct.yaml`` and ``train.py``): M = N/2, G = 1;
``norm_swiftkv`` <- layer M's input norm, ``q_proj_swiftkv`` <- ``q_proj``, a leader's
``k/v_proj_swiftkv`` <- the mean of its group's ``k/v_proj`` (biases too); AdamW, weight decay 0, 5 %
warmup. Deviations: training goes through the shared trainer (``distill.train_end_to_end``), so the
loss is the KL to the original's top-k next-token distribution at temperature 1 (official: full-vocabulary
KL at temperature 2 plus an MSE on the stream entering the last layer), on the calibration windows with a
held-out part choosing the best epoch; cosine decay. lr 2e-4 is the official rate for 1.5M samples; the
demo recipes use more. Details and measured numbers: docs/methods/swiftkv.md.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.arch.swiftkv import swiftkv_config, swiftkv_model_type
from compressor.arch.swiftkv.modeling_llama_swiftkv import add_swiftkv_projections, group_leader, rotate, swiftkv_layer
from compressor.distill import check_top_k, train_end_to_end
from compressor.step import Step, param, register_step
from compressor.training import warmup_cosine_schedule

if TYPE_CHECKING:
    from compressor.context import ModelContext
    from compressor.training import BestState

# ----------------------------------------------------------------------------------------------
# Math on tensors


def group_mean(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The AcrossKV initialisation of a group's shared projection: the mean of its members' (the
    official code zeroes it and adds ``W_l / G`` for each member)."""
    if tensors[0] is None:
        return None
    return sum(t.float() for t in tensors).div(len(tensors)).to(tensors[0].dtype)


def kv_cache_layers(num_layers: int, num_key_value_layers: int, group_size: int) -> int:
    """KV-cache entries per token: the M lower layers, then one per group of G upper layers."""
    return num_key_value_layers + (num_layers - num_key_value_layers) // group_size


def kv_cache_reduction(num_layers: int, num_key_value_layers: int, group_size: int) -> float:
    """The fraction of the KV cache AcrossKV saves: (N - M) / N * (1 - 1 / G)."""
    return (num_layers - num_key_value_layers) / num_layers * (1 - 1 / group_size)


@torch.no_grad()
def initialise_swiftkv(attentions: dict[int, nn.Module], config) -> None:
    """Copy each upper layer's query projection into ``q_proj_swiftkv`` and set each group leader's
    ``k/v_proj_swiftkv`` to the mean of its group's ``k/v_proj`` (``attentions``: layer index -> its
    attention, already holding the new projections)."""
    for index, attention in attentions.items():
        attention.q_proj_swiftkv.weight.copy_(attention.q_proj.weight)
        if attention.q_proj.bias is not None:
            attention.q_proj_swiftkv.bias.copy_(attention.q_proj.bias)
        if group_leader(config, index) != index:
            continue
        members = [a for i, a in attentions.items() if group_leader(config, i) == index]
        for role in ("k_proj", "v_proj"):
            target = getattr(attention, f"{role}_swiftkv")
            device = target.weight.device
            target.weight.copy_(group_mean([getattr(m, role).weight.to(device) for m in members]))
            if target.bias is not None:
                target.bias.copy_(group_mean([getattr(m, role).bias.to(device) for m in members]))


# ----------------------------------------------------------------------------------------------
# An upper layer, run block by block


class SwiftKVCarryLayer(nn.Module):
    """Upper decoder layer ``l >= M`` as the toolkit runs it: one block at a time (training with
    block-level recomputation and offload, later layer passes, the export writer).

    The blocks are called one after the other with only a hidden state between them, so the stream
    entering layer M (and, inside an AcrossKV group, the group's keys and values) travels as extra
    features of that hidden state: layer M takes ``h_M`` and returns ``[h_{M+1} | h_M | kv]``, each
    later layer reads what it needs and passes it on, the last returns ``h_N`` alone. Gradients flow
    through the carried part exactly as through the model-level forward. The submodules keep the
    decoder layer's names, so the block's tensors are the checkpoint's. ``norm_swiftkv`` lives beside
    the blocks (``model.norm_swiftkv``, on the device with the embedding), referenced, not owned."""

    def __init__(self, layer: nn.Module, config, index: int, norm_swiftkv: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.hidden_size = config.hidden_size
        self.head_dim = self.self_attn.head_dim
        self.first = index == config.num_key_value_layers
        self.last = index == config.num_hidden_layers - 1
        self.leader = group_leader(config, index) == index
        self.next_is_leader = not self.last and group_leader(config, index + 1) == index + 1
        self.shared = [norm_swiftkv]  # a list: not a submodule, so not in this block's tensors

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        width = self.hidden_size
        hidden = hidden_states[..., :width]
        entering = hidden if self.first else hidden_states[..., width : 2 * width]
        if self.leader:
            states = self.shared[0](entering)
            key_value = torch.cat([self.self_attn.k_proj_swiftkv(states), self.self_attn.v_proj_swiftkv(states)], -1)
        else:
            key_value = hidden_states[..., 2 * width :]
        keys, values = key_value.split(key_value.shape[-1] // 2, -1)
        shape = (*keys.shape[:-1], -1, self.head_dim)
        cos, sin = position_embeddings
        keys = rotate(keys.reshape(shape).transpose(1, 2), cos, sin)
        values = values.reshape(shape).transpose(1, 2)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
        output = swiftkv_layer(self, hidden, keys, values, cos, sin, mask)
        if self.last:
            return output
        return torch.cat([output, entering] + ([] if self.next_is_leader else [key_value]), -1)


def block_count(linears: dict) -> int | None:
    """Decoder blocks, counted from the full names of their linears (``model.layers.5.mlp...``)."""
    indices = [int(m.group(1)) for name in linears if (m := re.search(r"\.(\d+)\.", name))]
    return max(indices) + 1 if indices else None


# ----------------------------------------------------------------------------------------------
# The recipe step


@register_step("swiftkv")
@dataclass
class SwiftKV(Step):
    """SwiftKV: upper layers' keys/values from the stream entering layer M (SingleInputKV, AcrossKV), distilled."""

    changes_architecture = True
    families = ("llama", "qwen2")  # the shipped SwiftKV modeling code has these

    kind = "model"
    distributes = "gradients"  # each rank the sequences of every step it holds, gradients summed (distill.py)
    commits_progress = True  # the trainer commits its state for --resume (distill.train_end_to_end)

    num_key_value_layers: int | None = param(
        None,
        "M: layers 0..M-1 stay as they are; the keys and values of every later layer come from the stream entering "
        "layer M (null: N // 2, raised to the next M that leaves whole groups of G above it)",
        min=1,
    )
    key_value_group_size: int = param(
        1,
        "G (AcrossKV): consecutive upper layers sharing one key/value projection and KV-cache entry; must divide N - M",
        min=1,
    )
    epochs: int = param(2, "passes over the calibration set (0: the initialisation only, no distillation)", min=0)
    lr: float = param(2e-4, "AdamW learning rate of the new projections and norm (official: 2e-4)", min=0.0)
    batch_size: int = param(4, "sequences per optimizer step", min=1)
    micro_batch_size: int | None = param(None, "sequences per forward and backward (null: batch_size)", min=1)
    warmup_ratio: float = param(
        0.05, "fraction of the steps with linear warmup (official: 0.05), then cosine decay", min=0.0, max=1.0
    )
    top_k: int = param(64, "teacher log-probabilities kept per token (the rest of the vocabulary is one bucket)", min=1)
    heldout: float = param(
        0.1,
        "fraction of the calibration sequences held out: their KL is measured before training and after each epoch, "
        "and the best state is kept (0: train on all, keep the last)",
        min=0.0,
        max=0.5,
    )
    seed: int = param(0, "seed of the sample order (shuffled every epoch)")

    def check_config(self, config) -> None:
        check_top_k(self.top_k, config)

    def layers_for(self, num_layers: int) -> int:
        """M for a model of ``num_layers`` blocks, checked with G (errors name the key)."""
        layers = self.num_key_value_layers
        if layers is None:  # half the layers, or the fewest more that leave whole groups of G above
            layers = num_layers // 2
            while (num_layers - layers) % self.key_value_group_size:
                layers += 1
        if not 1 <= layers <= num_layers:
            raise ValueError(
                f"num_key_value_layers: {layers} is outside 1..{num_layers} (the model has {num_layers} layers)"
            )
        if (num_layers - layers) % self.key_value_group_size:
            raise ValueError(
                f"key_value_group_size: {self.key_value_group_size} does not divide the {num_layers - layers} layers "
                f"from num_key_value_layers = {layers} to the model's {num_layers}"
            )
        return layers

    def check_model(self, linears: dict) -> None:
        count = block_count(linears)
        if count is not None:
            self.layers_for(count)

    def compress_model(self, context: ModelContext) -> None:
        config = context.config
        swiftkv_model_type(config)
        num_layers = context.num_blocks
        first = self.layers_for(num_layers)
        group = self.key_value_group_size
        new_config = swiftkv_config(config, first, group)
        context.declare_architecture(new_config)
        summary = dict(
            num_key_value_layers=first,
            key_value_group_size=group,
            kv_cache_layers=kv_cache_layers(num_layers, first, group),
            num_layers=num_layers,
            kv_cache_reduction=round(kv_cache_reduction(num_layers, first, group), 6),
        )
        if first == num_layers:  # nothing is rewired: the model is the original
            context.record("model", **summary, steps=0)
            return

        norm, attentions = self.rewire(context, new_config, first)
        parameters = [norm.weight] + [
            p
            for attention in attentions.values()
            for name, p in attention.named_parameters()
            if name.split(".")[0].endswith("_swiftkv")
        ]
        losses, best = self.distill(context, parameters) if self.epochs else ([], None)
        steps_per_epoch = max(len(losses) // max(self.epochs, 1), 1)
        context.record(
            "model",
            **summary,
            steps=len(losses),
            trained_parameters=sum(p.numel() for p in parameters),
            **(
                {
                    "first_epoch_kl": sum(losses[:steps_per_epoch]) / steps_per_epoch,
                    "last_epoch_kl": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
                }
                if losses
                else {}
            ),
            **(best.summary() if best else {}),
        )

    def rewire(self, context: ModelContext, new_config, first: int) -> tuple[nn.Module, dict[int, nn.Module]]:
        """SingleInputKV and AcrossKV in place: ``norm_swiftkv`` (layer M's input norm), the new projections of
        every upper layer, initialised, and each upper layer wrapped to read the stream entering layer M.
        Returns the norm and the upper layers' attentions (by layer)."""
        blocks_path = context.adapter.blocks
        blocks = context.blocks
        source_norm = blocks[first].get_submodule(context.adapter.norms["input"])
        norm = copy.deepcopy(source_norm).to(context.device)  # initialised as layer M's input norm
        context.replace_module(f"{blocks_path.rpartition('.')[0]}.norm_swiftkv", norm)
        attentions = {}
        for index in range(first, context.num_blocks):
            attention = blocks[index].get_submodule(context.adapter.attention)
            add_swiftkv_projections(attention, new_config, index)
            attentions[index] = attention
        initialise_swiftkv(attentions, new_config)
        for index in range(first, context.num_blocks):
            context.replace_module(f"{blocks_path}.{index}", SwiftKVCarryLayer(blocks[index], new_config, index, norm))
        return norm, attentions

    def distill(self, context: ModelContext, parameters: list[nn.Parameter]) -> tuple[list[float], BestState | None]:
        """Train ``parameters`` (the rest stays frozen) towards the original's next-token distributions; the
        per-step KL and the held-out record."""
        for p in parameters:
            p.requires_grad_(True)
        lr_at = warmup_cosine_schedule(self.warmup_ratio)
        generator = torch.Generator().manual_seed(self.seed)
        try:
            return train_end_to_end(
                context,
                [{"params": parameters, "lr": self.lr}],
                name=self.name,
                epochs=self.epochs,
                batch_size=self.batch_size,
                micro_batch_size=self.micro_batch_size or self.batch_size,
                top_k=self.top_k,
                heldout=self.heldout,
                order=lambda epoch, count: torch.randperm(count, generator=generator),
                lr_at=lr_at,
            )
        finally:
            for p in parameters:
                p.requires_grad_(False)
                p.grad = None
