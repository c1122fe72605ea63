"""The session: runs a recipe's steps over a model, block by block, with bounded memory.

Consecutive *layer steps* form one pass over the decoder blocks. For block i the session loads its
weights from the checkpoint (or keeps the block a previous pass produced), hands it to each step
with the inputs produced by the already-compressed blocks 0..i-1, then runs the compressed block
to produce the inputs of block i+1. Only that block is on the compute device at full precision.
Data-free steps (RTN) skip every forward pass.

*Model steps* get the whole model at once (for gradients or end-to-end training) and run it through
``compressor.blockwise.BlockwiseModel``: block by block, with block-level recomputation for the
backward pass. When the weights would take more than 80% of the free device memory (or the session's
``offload`` says so) the blocks stay in CPU memory and visit the device one at a time.

When the last pass is a layer pass, finished blocks go straight to the exporter (``sink``) and are
freed, so applying RTN to a model larger than memory streams it shard by shard.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.blockwise import BlockwiseModel, catch_first_block_inputs, run_block
from compressor.context import BlockContext, ModelContext, RunState, model_dense_linears
from compressor.errors import StepError, UserError
from compressor.model import ModelHandle
from compressor.progress import track
from compressor.recipe import Recipe
from compressor.report import Report, peak_memory
from compressor.step import Step


@dataclass
class Session:
    handle: ModelHandle
    recipe: Recipe
    tokenizer: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 8
    progress: bool = True
    offload: bool | None = None  # model steps: None decides by free device memory
    report: Report = field(default_factory=Report)
    live_blocks: set = field(default_factory=set)  # blocks materialized (loaded or already compressed)
    _tokens: torch.Tensor | None = None
    run_state: RunState = field(init=False)  # what the steps' contexts share for this run

    def __post_init__(self):
        self.run_state = RunState(
            self.report, self.compute_dtype, self.export_dtype, self.calibration_tokens, self.progress
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """Forward passes run in the checkpoint dtype on a GPU and in fp32 on the CPU."""
        return self.handle.dtype if self.device.type == "cuda" else torch.float32

    @property
    def export_dtype(self) -> torch.dtype:
        name = self.recipe.export.dtype
        return self.handle.dtype if name == "auto" else getattr(torch, name)

    # --- running -------------------------------------------------------------------------------

    def run(self, sink=None) -> Report:
        """Run every step; finished blocks are handed to ``sink.write_module(prefix, block)``."""
        self.check_steps()
        passes = step_passes(self.recipe.steps)
        for number, (kind, steps) in enumerate(passes):
            last = number == len(passes) - 1
            started = time.perf_counter()
            if kind == "layer":
                self.run_layer_pass(steps, sink if last else None)
            else:
                with self.blame(steps[0]):
                    self.run_model_step(steps[0])
            self.report.add_step([s.name for s in steps], kind, time.perf_counter() - started, peak_memory(self.device))
        if sink is not None and passes[-1][0] == "model":
            for index in range(len(self.handle.blocks)):
                sink.write_module(self.handle.block_prefix(index), self.handle.blocks[index])
        return self.report

    def check_steps(self) -> None:
        """Every step's refusals, before any work. (A method of its own: the table of the skeleton's
        linears it builds must not outlive the checks, or each block's weights, loaded into those very
        modules, would stay alive after the block is compressed and written.)"""
        claimed: dict[str, int] = {}  # linear -> index of the step that quantizes it
        for index, step in enumerate(self.recipe.steps):
            with self.blame(step):
                step.check_config(self.handle.config)
                linears = model_dense_linears(self.handle, getattr(step, "ignore", []))
                step.check_model(linears)
                self.check_export_format(step, linears)
                self.check_step_order(index, step, linears, claimed)

    def check_step_order(self, index: int, step: Step, linears: dict, claimed: dict[str, int]) -> None:
        """The order rules: an architecture change comes before every quantizer, once per recipe; no linear is
        quantized by two steps (a second quantizer would find it quantized and skip it without a word)."""
        earlier = self.recipe.steps[:index]
        if step.changes_architecture:
            changed = next((i for i, s in enumerate(earlier) if s.changes_architecture), None)
            if changed is not None:
                raise ValueError(
                    f"steps[{changed}].{earlier[changed].name} changed the architecture already; one per recipe"
                )
            quantized = next((i for i, s in enumerate(earlier) if s.quantizes_weights), None)
            if quantized is not None:
                raise ValueError(
                    f"changes the architecture, so it comes before steps[{quantized}].{earlier[quantized].name} "
                    "(quantizers act on the final architecture)"
                )
        if step.writes_plain_uniform and self.recipe.export.format != "dense":
            cache = next((i for i, s in enumerate(self.recipe.steps) if s.declares_kv_cache), None)
            if cache is not None:
                raise ValueError(
                    f"its weights go to compressed-tensors, which cannot hold steps[{cache}]."
                    f"{self.recipe.steps[cache].name}'s quantized KV cache (only our native format records one); "
                    "export 'dense', or quantize the weights with a native-format method"
                )
        if step.needs_native_export:
            later = self.recipe.steps[index + 1 :]
            if self.recipe.export.format not in ("auto", "compressor") or not any(
                s.quantizes_weights and not s.writes_plain_uniform for s in later
            ):
                raise ValueError(
                    "online_hadamard: the online Hadamard before down_proj is recorded by our native format only; "
                    "quantize activations after it (activation_bits) with export format 'auto', or set "
                    "online_hadamard: false"
                )
        if step.quantizes_weights:
            for name in linears:
                if name in claimed:
                    other = claimed[name]
                    raise ValueError(
                        f"{name} is quantized by steps[{other}].{earlier[other].name} already; give one of the two an "
                        "ignore pattern so each linear is quantized once"
                    )
                claimed[name] = index

    def check_export_format(self, step: Step, linears: dict) -> None:
        """Refuse, before any work, weights the chosen export format cannot hold (GPTQ: 2/3/4/8-bit
        uniform weights whose layers pack whole words)."""
        if self.recipe.export.format == "gptq":
            from compressor.export import gptq

            problem = gptq.step_problem(step, linears)
            if problem is not None:
                raise ValueError(f"{problem}; export format 'gptq' cannot write it (use compressed-tensors, or dense)")

    @contextmanager
    def blame(self, step: Step):
        """Errors from inside ``step`` name the recipe file and the step: a ``ValueError`` (the step
        refusing its settings or the model) becomes a one-line ``StepError``; anything else keeps its
        traceback and gains a note saying where it happened."""
        index = next(i for i, s in enumerate(self.recipe.steps) if s is step)
        where = f"{self.recipe.source}: steps[{index}].{step.name}"
        try:
            yield
        except UserError:
            raise
        except ValueError as error:
            message = str(error).removeprefix(f"{step.name}: ")
            key = message.split(":", 1)[0]
            joined = (
                f"{where}.{message}" if key in {f.name for f in dataclasses.fields(step)} else f"{where}: {message}"
            )
            raise StepError(joined) from error
        except Exception as error:
            error.add_note(f"in {where}")
            raise

    def load_block(self, index: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> nn.Module:
        """Block ``index`` on the device: as a previous pass left it, or read from the checkpoint."""
        dtype, device = dtype or self.compute_dtype, device or self.device
        if index in self.live_blocks:  # .to(dtype) casts floating tensors only: codes stay integers
            return self.handle.blocks[index].to(device, dtype)
        self.live_blocks.add(index)
        return self.handle.materialize(self.handle.block_prefix(index), device, dtype)

    def run_layer_pass(self, steps: list[Step], sink=None) -> None:
        needs_data = any(step.needs_calibration for step in steps)
        inputs, kwargs = self.capture_block_inputs() if needs_data else (None, None)
        names = "+".join(step.name for step in steps)
        for index in track(range(len(self.handle.blocks)), names, unit="block", enabled=self.progress):
            prefix = self.handle.block_prefix(index)
            # Data-free passes never run the block: keep its weights in the checkpoint dtype.
            block = self.load_block(index, None if needs_data else self.handle.dtype)
            for step in steps:
                with self.blame(step):
                    step.compress_block(
                        BlockContext(
                            handle=self.handle,
                            device=self.device,
                            run=self.run_state,
                            step=step,
                            state=self.run_state.state_of(step),
                            index=index,
                            block=block,
                            inputs=inputs,
                            block_kwargs=kwargs,
                        )
                    )
            self.report.check_fused_groups(prefix, block, self.handle.adapter)
            if needs_data and index + 1 < len(self.handle.blocks):
                inputs = self.run_block(block, inputs, kwargs)
            if sink is not None:
                sink.write_module(prefix, block)
                self.handle.release(block)
                self.live_blocks.discard(index)
            else:
                block.to("cpu")

    def run_model_step(self, step: Step) -> None:
        offloaded = self.should_offload() if self.offload is None else self.offload
        for name in self.handle.outside_block_modules():
            self.handle.materialize(name, self.device, self.compute_dtype)
        for index in range(len(self.handle.blocks)):
            block = self.load_block(index, device=torch.device("cpu") if offloaded else None)
            if offloaded and self.device.type == "cuda":
                block.to("cpu")  # an earlier pass may have left it on the device
        if self.handle.tied_embeddings:
            self.handle.model.tie_weights()
        runner = BlockwiseModel(self.handle, self.device, offloaded)
        step.compress_model(
            ModelContext(
                handle=self.handle,
                device=self.device,
                run=self.run_state,
                step=step,
                state=self.run_state.state_of(step),
                runner=runner,
            )
        )

    def should_offload(self) -> bool:
        """Offload the blocks when the weights would take more than 80% of the free device memory."""
        return not self.handle.fits_on(self.device, self.compute_dtype)

    # --- calibration forward passes --------------------------------------------------------------

    def calibration_tokens(self) -> torch.Tensor:
        if self._tokens is None:
            from compressor.calibration import calibration_tokens

            if self.tokenizer is None:
                raise ValueError("this recipe needs calibration data, so the session needs the model's tokenizer")
            self._tokens = calibration_tokens(self.tokenizer, self.recipe.calibration)
        return self._tokens

    @torch.no_grad()
    def capture_block_inputs(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Embed the calibration tokens and catch what the model hands its first block."""
        embed = self.handle.adapter.embed_tokens
        # an embedding a model step left materialized holds its changes (rotate): keep it, do not reload it
        held = not any(p.is_meta for p in self.handle.model.get_submodule(embed).parameters())
        self.handle.materialize(embed, self.device, self.compute_dtype)
        base_model = self.handle.base_model
        for buffer_owner in base_model.modules():
            for name, buffer in buffer_owner.named_buffers(recurse=False):
                if buffer.device != self.device and not buffer.is_meta:
                    setattr(buffer_owner, name, buffer.to(self.device))
        captured_inputs, captured_kwargs = [], []
        for batch in self.calibration_tokens().split(self.batch_size):
            hidden, kwargs = catch_first_block_inputs(base_model, self.handle.blocks[0], batch.to(self.device))
            captured_inputs.append(hidden)
            captured_kwargs.append(kwargs)
        if not held:
            self.handle.release(self.handle.model.get_submodule(embed))
        return captured_inputs, captured_kwargs

    def run_block(self, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        return run_block(block, inputs, kwargs)


def step_passes(steps: list[Step]) -> list[tuple[str, list[Step]]]:
    """Group consecutive layer steps into one pass; each model step is a pass of its own."""
    passes: list[tuple[str, list[Step]]] = []
    for step in steps:
        if step.kind == "layer" and passes and passes[-1][0] == "layer":
            passes[-1][1].append(step)
        else:
            passes.append((step.kind, [step]))
    return passes
