"""The step contract: what a recipe step sees of the model and of the run, and all it may change.

A layer step's ``compress_block`` gets a ``BlockContext`` (one decoder block and its calibration
inputs); a model step's ``compress_model`` gets a ``ModelContext`` (the whole materialized model, run
block by block). Both hold the model handle, the device and the run (``RunState``: report, dtypes,
calibration tokens, the cached teacher, each step's own state), never the session, and offer what
steps need instead of letting them reach around it:

* the linears of a block or of the model, minus ``ignore`` patterns (``matches_any``), and
  ``replace_linear`` / ``replace_module`` (a linear, or a block's whole ``attention`` or ``mlp``);
* ``state``: a dict that lives for the run, one per recipe step (Block-AP's fp activation chain);
* ``teacher``: the original model's top-k next-token distribution, computed once per run;
* ``declare_architecture`` / ``declare_kv_cache``: a step that changes the architecture or quantizes the
  KV cache says what the export declares (``ExportDeclaration``) instead of editing the handle.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.arch import ExportArchitecture, block_linears
from compressor.blockwise import BlockwiseModel, run_block
from compressor.declaration import ExportDeclaration
from compressor.distill import teacher_top_k
from compressor.distributed import Distributed
from compressor.model import ModelHandle, return_freed_memory
from compressor.modules.linear import QuantizedLinear
from compressor.progress import Progress
from compressor.report import Report
from compressor.step import Step

TRIM_EVERY = 16 * 2**20  # bytes of replaced weights between two trims of the heap (``BlockContext.trim_heap``)


def matches_any(name: str, patterns: list[str]) -> bool:
    """``re:REGEX`` searches the full module name; a plain pattern is a glob over the full name, or
    over its last component when it has no dot (so ``lm_head`` and ``q_proj`` work as written)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or (
            "." not in pattern and fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
        ):
            return True
    return False


def dense_linears(adapter, block: nn.Module, prefix: str, ignore: list[str]) -> dict[str, nn.Linear]:
    """A block's still-dense projections (path inside the block -> module), minus those whose full
    name (``prefix.path``) matches ``ignore``. Layers an earlier step already quantized are not offered."""
    return {
        name: module
        for name, module in block_linears(adapter, block).items()
        if isinstance(module, nn.Linear) and not matches_any(f"{prefix}.{name}", ignore)
    }


def model_dense_linears(handle: ModelHandle, ignore: list[str], indices=None) -> dict[str, nn.Linear]:
    """``dense_linears`` of every block (or of the blocks ``indices``), by full module name."""
    linears = {}
    for index in range(len(handle.blocks)) if indices is None else indices:
        prefix = handle.block_prefix(index)
        linears.update(
            {
                f"{prefix}.{name}": module
                for name, module in dense_linears(handle.adapter, handle.blocks[index], prefix, ignore).items()
            }
        )
    return linears


@dataclass
class RunState:
    """What lives as long as one run: shared by every step's context, owned by the session."""

    report: Report
    compute_dtype: torch.dtype  # forward passes
    export_dtype: torch.dtype  # scales and unquantized tensors in the checkpoint
    calibration_tokens: Callable[[], torch.Tensor]  # [samples, seq_len], built on first call
    show_progress: bool = True  # progress of long work inside steps (quiet sessions: False)
    step_states: dict[int, dict] = field(default_factory=dict)  # id of a recipe step -> its state (see ``state_of``)
    teachers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # top_k -> (log-probs, token ids)
    export: ExportDeclaration = field(default_factory=ExportDeclaration)  # what the steps declared about the export
    distributed: Distributed = field(default_factory=Distributed)  # this process's rank in the run (one: world size 1)
    commits: object = None  # a ``compressor.resume.Commits`` where training commits its progress (None: nowhere)

    def state_of(self, step: Step) -> dict:
        """The state dict of one step of the recipe (by identity: a recipe may hold two equal steps)."""
        return self.step_states.setdefault(id(step), {})


@dataclass(kw_only=True)
class StepContext:
    """What both kinds of step see: the handle, the device, the run, and this step's run state."""

    handle: ModelHandle
    device: torch.device
    run: RunState
    step: Step
    state: dict  # this step's own state for the run (kept across blocks and passes)

    @property
    def config(self):
        """The input model's transformers config."""
        return self.handle.config

    @property
    def adapter(self):
        return self.handle.adapter

    @property
    def source_path(self) -> Path:
        """The input checkpoint's folder (read-only)."""
        return self.handle.path

    @property
    def num_blocks(self) -> int:
        return len(self.handle.blocks)

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype scales and codebooks are stored in (the export dtype)."""
        return self.run.export_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.run.compute_dtype

    def calibration_tokens(self) -> torch.Tensor:
        return self.run.calibration_tokens()

    def original_block(self, index: int) -> nn.Module:
        """Block ``index`` as the input checkpoint has it, as a new module on the device in the compute
        dtype (MoDeGPT scores every block of the original model before compressing the first)."""
        return self.handle.original_block(index, self.device, self.compute_dtype)

    def progress(self, total: int | None, what: str, unit: str = "it") -> Progress:
        """Progress of a phase of this step (samples, layers, training steps), unless the session is quiet."""
        return Progress(total, f"{self.where}: {what}", unit, enabled=self.run.show_progress)

    @property
    def where(self) -> str:
        return self.step.name

    def declare_architecture(self, config) -> None:
        """The export will declare ``config`` (a shipped architecture: ``compressor.arch.shipped``, whose row
        says which modeling code ships with it), instead of the input's."""
        self.run.export.architecture = ExportArchitecture.declared(config)

    def declare_kv_cache(self, spec) -> None:
        """The export will say that the model runs with this quantized KV cache (a cache method's spec,
        ``compressor.kvcache``; the ``kv_cache`` entry of its ``quantization_config``), so loaders install it."""
        self.run.export.kv_cache = spec


@dataclass(kw_only=True)
class BlockContext(StepContext):
    """What a layer step sees of block ``index``: the block, its calibration inputs, and helpers."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor] | None  # hidden states entering the block, one tensor per batch (None: data-free pass)
    block_kwargs: list[dict] | None  # the keyword arguments the model passes its blocks, per batch
    replaced_bytes: int = 0  # weights replaced since the heap was last trimmed (``replace_linear``)

    @property
    def prefix(self) -> str:
        return self.handle.block_prefix(self.index)

    @property
    def where(self) -> str:
        return f"{self.step.name} block {self.index}"

    def linears(self, ignore: list[str]) -> dict[str, nn.Linear]:
        """The block's still-dense projections (path inside the block -> module), minus ``ignore``.

        Layers an earlier step already quantized are not offered again."""
        return dense_linears(self.adapter, self.block, self.prefix, ignore)

    def replace_linear(self, name: str, quantized_weight) -> QuantizedLinear:
        """Swap the linear at ``name`` (path inside the block) for a ``QuantizedLinear`` of the value."""
        linear = self.block.get_submodule(name)
        module = QuantizedLinear(quantized_weight, linear.bias)
        self.block.set_submodule(name, module)
        self.trim_heap(linear.weight.numel() * linear.weight.element_size())
        return module

    def trim_heap(self, freed: int) -> None:
        """Hand the heap's free pages back to the OS after every ``TRIM_EVERY`` bytes of replaced weights. glibc takes
        a linear's temporaries (fp32 copies of a few MiB) from the heap, between the codes kept of the linears
        quantized before, and keeps the freed holes; a MoE block of hundreds of expert linears then held 3 to 5 times
        its codes that way until it was released (``benchmarks/memory.py --experts 64``)."""
        self.replaced_bytes += freed
        if self.replaced_bytes >= TRIM_EVERY:
            return_freed_memory()
            self.replaced_bytes = 0

    def replace_module(self, name: str, module: nn.Module) -> None:
        """Swap any module of the block, e.g. its whole attention (``adapter.attention``) or MLP (``adapter.mlp``)."""
        self.block.set_submodule(name, module)

    def attach_tensor(self, module: str, name: str, tensor: torch.Tensor) -> None:
        """Give the block's module ``module`` a buffer ``name`` (K-sort's ``k_perm``): the export writes it
        beside the module's weights, as ``prefix.module.name``."""
        self.block.get_submodule(module).register_buffer(name, tensor)

    def forward(self, block: nn.Module | None = None, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run ``block`` (default: this block as it is now) on the calibration inputs (default: this block's)."""
        return run_block(block or self.block, inputs if inputs is not None else self.inputs, self.block_kwargs)

    def record(self, module: str, **numbers) -> None:
        self.run.report.add_row(step=self.step.name, block=self.index, module=f"{self.prefix}.{module}", **numbers)


@dataclass(kw_only=True)
class ModelContext(StepContext):
    """What a model step sees: the whole materialized model, the calibration tokens, and the
    block-by-block forward/backward (the only way to run the model when ``offloaded``)."""

    runner: BlockwiseModel

    @property
    def model(self) -> nn.Module:
        return self.handle.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.handle.blocks

    @property
    def offloaded(self) -> bool:
        """True when the blocks live in CPU memory and visit the device one at a time."""
        return self.runner.offloaded

    def linears(self, ignore: list[str], block: int | None = None) -> dict[str, nn.Linear]:
        """Still-dense projections of every block (or of block ``block``), by full module name, minus ``ignore``."""
        return model_dense_linears(self.handle, ignore, range(self.num_blocks) if block is None else [block])

    def quantized_linears(self, ignore: list[str]) -> dict[str, QuantizedLinear]:
        """Every ``QuantizedLinear`` of the model (blocks and LM head), by full module name, minus ``ignore``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, QuantizedLinear) and not matches_any(name, ignore)
        }

    def replace_linear(self, name: str, quantized_weight) -> QuantizedLinear:
        """Swap the linear at full module name ``name`` for a ``QuantizedLinear``, on the linear's device."""
        linear = self.model.get_submodule(name)
        module = QuantizedLinear(quantized_weight, linear.bias).to(linear.weight.device)
        self.model.set_submodule(name, module)
        return module

    def replace_module(self, name: str, module: nn.Module) -> None:
        """Swap the module at full name ``name`` (a built ``QuantizedLinear``, a block's attention or MLP...)."""
        self.model.set_submodule(name, module)

    def teacher(self, top_k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The original model's top-``top_k`` next-token log-probabilities and token ids over the
        calibration tokens, on the CPU; computed once per run (``compressor.distill.teacher_top_k``)."""
        if top_k not in self.run.teachers:
            tokens = self.calibration_tokens()
            with self.progress(len(tokens), "the original model's next-token distributions", "sequence") as progress:
                self.run.teachers[top_k] = teacher_top_k(
                    self.source_path,
                    tokens,
                    self.device,
                    self.compute_dtype,
                    self.offloaded,
                    top_k,
                    batch_size,
                    progress,
                )
        return self.run.teachers[top_k]

    def forward_backward(self, input_ids: torch.Tensor, loss_fn=None) -> float:
        """One forward + backward pass on a batch; gradients accumulate into every trainable tensor.
        ``loss_fn(logits, input_ids)`` defaults to the mean next-token cross-entropy."""
        return self.runner.forward_backward(input_ids, loss_fn)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits on the device, without autograd."""
        return self.runner.logits(input_ids)

    def record(self, module: str, block: int | None = None, **numbers) -> None:
        where = {} if block is None else {"block": block}
        self.run.report.add_row(step=self.step.name, **where, module=module, **numbers)
