"""Catching what a decoder model hands its blocks, without running them: the hidden states the first block
gets and each block's keyword arguments (rotary embeddings, masks). The layer passes, the blockwise runner and
the generic adapter's probe (``arch/generic.py``) all catch block inputs this one way."""

from __future__ import annotations

import torch
from torch import nn


class _InputsCaught(Exception):
    pass


def first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _StandIn(nn.Module):
    """Takes a block's place while the inputs are caught: keeps what the model hands it, and hands the
    hidden states on (so no block runs, and none needs its weights); the last one stops the model."""

    def __init__(self, block: nn.Module, caught: list, last: bool):
        super().__init__()
        self.caught, self.last = caught, last
        self.__dict__["block"] = block  # not a submodule: only read for attributes the model asks of its layers

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. ``decoder_layer.attention_type``, which some models read
            return getattr(self.__dict__["block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.caught.append((hidden, kwargs))
        if self.last:
            raise _InputsCaught
        return hidden


def catch_block_inputs(
    base_model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor
) -> tuple[torch.Tensor, list[dict]]:
    """Run the base model with stand-ins in its blocks' places; return the hidden states the first block
    gets and the keyword arguments each block gets: the rotary embeddings and masks of sliding-window and
    full-attention layers differ (Gemma 2 and 3). The rest of the model is never run, so it may live
    anywhere, even on meta."""
    caught: list = []
    originals = list(blocks)
    for index in range(len(originals)):
        blocks[index] = _StandIn(originals[index], caught, last=index == len(originals) - 1)
    try:
        base_model(input_ids=input_ids, use_cache=False)
    except _InputsCaught:
        pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    if len(caught) != len(originals):
        raise RuntimeError(f"the model called {len(caught)} of its {len(originals)} decoder blocks")
    return caught[0][0], [kwargs for _, kwargs in caught]
