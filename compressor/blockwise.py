"""Running a whole causal LM one decoder block at a time: forward, and backward with recomputation.

Model steps (Fisher information, end-to-end training of scales, distillation) need gradients of the
language-model loss through every block. ``BlockwiseModel`` computes them without ever holding more
than one block's activations graph, and, when the model does not fit on the device, without holding
more than one block's weights there:

1. embed the batch and catch what the model hands its first block (hidden states plus the exact
   keyword arguments: rotary position embeddings, masks), with the same pre-hook the layer passes use;
2. run the blocks in order without autograd, keeping each block's input (``layers x batch x seq x
   hidden`` numbers on the device: 0.5 GB for an 8B model at 2048 tokens in bf16);
3. apply the final norm and LM head with autograd on, take the loss, and backpropagate to the last
   block's output;
4. for each block from last to first: run it again on its kept input (now with autograd), backpropagate
   the output gradient through it, and pass the input gradient to the block before.

This is gradient checkpointing at block granularity: one extra forward pass, and parameter gradients
accumulate into ``.grad`` exactly as ``loss.backward()`` on the whole model would (hooks such as
``register_post_accumulate_grad_hook`` fire once per parameter per call). Backpropagation stops at the
first block that has trainable tensors, or goes on into the embedding if it has any.

Offloading: when ``offloaded`` is set, blocks live in CPU memory and each is moved to the device for
its forward and again for its recomputation (``module.to``: parameters, buffers and gradients move
together, so trainable tensors keep their identity and optimisers see them on the CPU). The
embedding, final norm and LM head stay on the device. An 8B model in bf16 crosses PCIe twice per
batch (2 x 16 GB), about a second on a Gen5 link.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from compressor.arch import final_logits
from compressor.arch.blocks import catch_block_inputs, first_output

__all__ = [
    "BlockwiseModel",
    "InputHooks",
    "catch_block_inputs",
    "first_output",
    "next_token_loss",
    "run_block",
    "weight_gradients",
]


class InputHooks:
    """While ``with`` lasts, each named submodule of ``block`` hands its input (detached) to ``catch(name, x)``
    before it runs: the one way methods watch a block's linears (GPTQ's Hessians, AWQ's samples)."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.block, self.names = block, names
        self.hooks = []

    def catch(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def __enter__(self):
        def hook(name):
            return lambda module, args: self.catch(name, args[0].detach())

        self.hooks = [self.block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in self.names]
        return self

    def __exit__(self, *exc):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


@contextmanager
def weight_gradients(modules: dict[str, nn.Module], take=None):
    """While ``with`` lasts, each module's weight takes gradients (so ``BlockwiseModel.forward_backward`` runs the
    backward through its block), each handed to ``take(name, grad)`` as soon as it is accumulated, then dropped:
    no gradient outlives its hook. Afterwards the weights are frozen again."""

    def hook(name):
        def arrived(parameter):
            if take is not None:
                take(name, parameter.grad.detach())
            parameter.grad = None

        return arrived

    handles = []
    try:
        for name, module in modules.items():
            module.weight.requires_grad_(True)
            handles.append(module.weight.register_post_accumulate_grad_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            module.weight.requires_grad_(False)
            module.weight.grad = None


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """A block's outputs on a list of input batches, each with the keyword arguments caught for it."""
    return [first_output(block(hidden, **kw)) for hidden, kw in zip(inputs, kwargs)]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens ..t (what ``labels=input_ids`` computes)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters()) or any(b.requires_grad for b in module.buffers())


class BlockwiseModel:
    """A materialized causal LM (``ModelHandle`` after a model step loaded it), run block by block."""

    def __init__(self, handle, device: torch.device, offloaded: bool = False):
        self.handle = handle
        self.device = torch.device(device)
        self.offloaded = offloaded
        adapter = handle.adapter
        self.base_model = handle.base_model
        self.embed = handle.model.get_submodule(adapter.embed_tokens)
        self.norm = handle.model.get_submodule(adapter.final_norm)
        self.lm_head = handle.model.get_submodule(adapter.lm_head)
        self.on_device: set[int] = set()  # indices of blocks currently visiting the device (offloaded mode)

    @property
    def blocks(self) -> list[nn.Module]:
        """The model's blocks as they are now (a model step may have swapped some: SwiftKV's upper layers)."""
        return list(self.handle.blocks)

    @contextmanager
    def resident(self, index: int):
        """Block ``index`` on the device for the duration (a no-op unless offloaded)."""
        if not self.offloaded:
            yield self.blocks[index]
            return
        block = self.blocks[index].to(self.device)
        self.on_device.add(index)
        try:
            yield block
        finally:
            block.to("cpu")
            self.on_device.discard(index)

    def first_block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """The first block's hidden states and each block's keyword arguments."""
        with torch.no_grad():
            return catch_block_inputs(self.base_model, self.handle.blocks, input_ids.to(self.device))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the last block's output: final norm, LM head, and what the family does after it
        (Gemma's soft-capping, Cohere's and Granite's scales)."""
        return final_logits(self.handle.adapter, self.handle.model.config, self.lm_head(self.norm(hidden)).float())

    def run_blocks(
        self, hidden: torch.Tensor, kwargs: list[dict], keep_inputs: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = []
        with torch.no_grad():
            for index in range(len(self.blocks)):
                if keep_inputs:
                    inputs.append(hidden)
                with self.resident(index) as block:
                    hidden = first_output(block(hidden, **kwargs[index]))
        return hidden, inputs

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[batch, seq, vocab]`` on the device, without autograd."""
        hidden, kwargs = self.first_block_inputs(input_ids)
        hidden, _ = self.run_blocks(hidden, kwargs)
        return self.head(hidden)

    def forward_backward(self, input_ids: torch.Tensor, loss_fn=None) -> float:
        """Loss of one batch, with gradients accumulated into every trainable tensor; returns the loss."""
        loss_fn = loss_fn or next_token_loss
        input_ids = input_ids.to(self.device)
        hidden, kwargs = self.first_block_inputs(input_ids)
        output, inputs = self.run_blocks(hidden, kwargs, keep_inputs=True)
        output = output.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(self.head(output), input_ids)
            loss.backward()
        grad = output.grad
        trainable = [has_trainable(block) for block in self.blocks]
        embed_trainable = has_trainable(self.embed)
        for index in reversed(range(len(self.blocks))):
            if not (embed_trainable or any(trainable[: index + 1])):
                break  # nothing at or below this block learns
            with self.resident(index) as block, torch.enable_grad():
                block_input = inputs[index].detach().requires_grad_(True)
                torch.autograd.backward(first_output(block(block_input, **kwargs[index])), grad)
            grad, inputs[index] = block_input.grad, None
        else:
            if embed_trainable:
                with torch.enable_grad():
                    torch.autograd.backward(self.embed(input_ids), grad)
        return loss.item()
