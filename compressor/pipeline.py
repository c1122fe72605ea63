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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.blockwise import BlockwiseModel, catch_block_inputs, run_block
from compressor.context import BlockContext, ModelContext, RunState, model_dense_linears
from compressor.distributed import Distributed, refusal
from compressor.errors import StepError, UserError
from compressor.export.compressed_tensors import kv_cache_scheme
from compressor.model import ModelHandle
from compressor.moe import calibrating, check_expert_schemes, report_census
from compressor.progress import track
from compressor.recipe import Recipe, writes_native_format
from compressor.report import Report, free_memory, peak_memory
from compressor.step import RecipeError, Step


@dataclass
class Session:
    handle: ModelHandle
    recipe: Recipe
    tokenizer: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 8
    progress: bool = True
    offload: bool | None = None  # model steps: None decides by free device memory
    distributed: Distributed = field(default_factory=Distributed)  # this process's rank (world size 1: alone)
    commits: object = None  # a ``compressor.resume.Commits``: each finished block committed for --resume
    resume_from: int = -1  # the last block a resumed run committed (-1: start from block 0)
    activation_bytes: int = 0  # the hidden states entering a block, for this process's calibration samples
    report: Report = field(default_factory=Report)
    live_blocks: set = field(default_factory=set)  # blocks materialized (loaded or already compressed)
    _tokens: torch.Tensor | None = None
    run_state: RunState = field(init=False)  # what the steps' contexts share for this run

    def __post_init__(self):
        self.run_state = RunState(
            self.report,
            self.compute_dtype,
            self.export_dtype,
            self.calibration_tokens,
            self.progress,
            distributed=self.distributed,
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
        self.run_state.commits = self.commits  # training phases commit their progress there (--resume)
        self.report.summary["architecture"] = describe_adapter(self.handle.adapter)
        passes = step_passes(self.recipe.steps)
        for number, (kind, steps) in enumerate(passes):
            last = number == len(passes) - 1
            started = time.perf_counter()
            if kind == "layer":
                for step in steps:  # a layer step that first decides something on the whole model (bit allocation)
                    if step.prepares_model:
                        with self.blame(step):
                            self.run_model_step(step, prepare=True)
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
        self.check_calibration_memory()
        claimed: dict[str, int] = {}  # linear -> index of the step that quantizes it
        for index, step in enumerate(self.recipe.steps):
            with self.blame(step):
                self.check_family(step)
                why = refusal(step, self.distributed.world_size)
                if why is not None:
                    raise ValueError(why)
                step.check_config(self.handle.config)
                linears = model_dense_linears(self.handle, getattr(step, "ignore", []))
                step.check_model(linears)
                self.check_export_format(step, linears)
                self.check_step_order(index, step, linears, claimed)
                self.check_block_groups(step)

    def check_block_groups(self, step: Step) -> None:
        """A step that compresses several blocks together shares its layer pass only with steps that take as many."""
        for kind, steps in step_passes(self.recipe.steps):
            other = next((s for s in steps if s.blocks_per_call != step.blocks_per_call), None)
            if kind == "layer" and step.blocks_per_call > 1 and any(s is step for s in steps) and other is not None:
                raise ValueError(
                    f"group_blocks: {step.blocks_per_call} compresses blocks in groups, and {other.name}, in the same "
                    "pass over the blocks, takes them one at a time; set group_blocks: 1 or give the other step its "
                    "own recipe"
                )

    def check_calibration_memory(self) -> None:
        """Refuse, before any work, calibration that cannot fit: a layer pass holds the inputs and outputs of one
        block for its share of the samples (``samples x seq_len x hidden`` in the compute dtype, twice) in host
        memory."""
        if not self.recipe.needs_calibration:
            return
        calibration = self.recipe.calibration
        share = -(-calibration.samples // self.distributed.world_size)  # each rank holds its share of the samples
        tokens = share * calibration.seq_len
        element = torch.empty((), dtype=self.compute_dtype).element_size()
        needed = tokens * (2 * self.handle.config.hidden_size * element + 8)
        available = free_memory(torch.device("cpu"))  # the host's MemAvailable
        if available is not None and needed > available:
            raise RecipeError(
                f"{self.recipe.source}: calibration.samples: {calibration.samples} x seq_len {calibration.seq_len} "
                f"needs about {needed / 2**30:.1f} GiB for one block's calibration inputs and outputs (hidden size "
                f"{self.handle.config.hidden_size}), more than the {available / 2**30:.1f} GiB this machine has "
                "available; use fewer samples"
            )

    def check_family(self, step: Step) -> None:
        """The one place a step's declared ``families`` is checked against the model's, before any work; and a
        family with no native-format model type refuses the steps whose weights or KV cache only that holds."""
        adapter = self.handle.adapter
        if step.families is not None and (adapter.generic or adapter.family not in step.families):
            raise ValueError(
                f"assumes the block of {', '.join(step.families)}; {adapter.family} is not one of them "
                f"({'; '.join(adapter.differs)})"
            )
        if writes_native_format(step) and self.recipe.export.format != "dense" and not has_native_type(adapter.family):
            raise ValueError(
                f"writes our native format, which has no model type for {adapter.family} (compressor/arch/native); "
                "quantize with rtn, gptq or efficientqat (compressed-tensors), or export 'dense'"
            )

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
            if cache is not None and kv_cache_scheme(self.recipe.steps[cache].cache_spec.to_dict()) is None:
                raise ValueError(
                    f"its weights go to compressed-tensors, which cannot hold steps[{cache}]."
                    f"{self.recipe.steps[cache].name}'s quantized KV cache (its kv_cache_scheme is an FP8 cache of "
                    "keys and values, prompt included; our native format records the others); export 'dense', or "
                    "quantize the weights with a native-format method"
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
        uniform weights whose layers pack whole words, of one symmetry)."""
        if self.recipe.export.format == "gptq":
            from compressor.export import gptq

            problem = gptq.step_problem(step, linears)
            other = next((s for s in self.recipe.steps if gptq.symmetry_differs(s, step)), None)
            if problem is None and other is not None:
                problem = f"symmetric: {step.symmetric}, and {other.name}'s is {other.symmetric}: a GPTQ config has one"
            if problem is not None:
                raise ValueError(f"{problem}; export format 'gptq' cannot write it (use compressed-tensors, or dense)")

    def gptq_first(self) -> bool:
        """Whether export 'auto' writes every asymmetric uniform weight as GPTQ: some step may make asymmetric
        weights below 4 bits, which go there (``export/codecs.py``), and the others must share their checkpoint."""
        from compressor.export import gptq

        return self.recipe.export.format == "auto" and any(
            gptq.writes_low_asymmetric(step, model_dense_linears(self.handle, getattr(step, "ignore", [])))
            for step in self.recipe.steps
        )

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

    @property
    def commits_blocks(self) -> bool:
        """Whether finished blocks are committed for --resume: a recipe of one layer pass, with somewhere to commit."""
        return self.commits is not None and one_layer_pass(self.recipe.steps)

    def run_layer_pass(self, steps: list[Step], sink=None) -> None:
        needs_data = any(step.needs_calibration for step in steps)
        commits = self.commits if self.commits_blocks and sink is not None else None
        start = self.resume_from + 1 if commits is not None else 0
        if start:  # --resume: blocks 0..start-1 come from the commits, and this rank's inputs of block start
            inputs, kwargs = commits.restore(start - 1, self.run_state, self.recipe.steps, self.device)
            for index in range(start):
                if self.distributed.writes:
                    sink.write_module(self.handle.block_prefix(index), commits.committed_block(index, "cpu"))
        else:
            inputs, kwargs = self.capture_block_inputs() if needs_data else (None, None)
        names = "+".join(step.name for step in steps)
        group = max(step.blocks_per_call for step in steps)  # blocks compressed together (check_steps: one size a pass)
        if start % group:
            from compressor.resume import ResumeError

            raise ResumeError(
                f"the interrupted run committed block {start - 1}, inside a group of {group} blocks that "
                "compress together; run it again without --resume"
            )
        for first in track(
            range(start, len(self.handle.blocks), group),
            names,
            unit="group" if group > 1 else "block",
            enabled=self.progress,
        ):
            indices = range(first, min(first + group, len(self.handle.blocks)))
            self.distributed.doing(f"{names} on block {first if group == 1 else f'{first}-{indices[-1]}'}")
            # Data-free passes never run the block: keep its weights in the checkpoint dtype.
            blocks = {index: self.load_block(index, None if needs_data else self.handle.dtype) for index in indices}
            if needs_data:
                self.count_routed_tokens(self.handle.block_prefix(first), blocks[first], inputs, kwargs[first])
            policy = self.recipe.calibration.expert_calibration if needs_data else "routed"
            for step in steps:
                contexts = [
                    BlockContext(
                        handle=self.handle,
                        device=self.device,
                        run=self.run_state,
                        step=step,
                        state=self.run_state.state_of(step),
                        index=index,
                        block=blocks[index],
                        inputs=inputs if index == first else None,
                        block_kwargs=kwargs[index] if needs_data else None,
                    )
                    for index in indices
                ]
                with self.blame(step), ExitStack() as stack:
                    for context in contexts:
                        stack.enter_context(calibrating(self.handle.adapter, context.block, policy))
                    if group > 1:
                        step.compress_group(contexts)
                    else:
                        step.compress_block(contexts[0])
            for index, block in blocks.items():
                prefix = self.handle.block_prefix(index)
                self.report.check_fused_groups(prefix, block, self.handle.adapter)
                check_expert_schemes(self.report, prefix, self.handle.adapter, block)
                if needs_data and index + 1 < len(self.handle.blocks):
                    inputs = self.run_block(block, inputs, kwargs[index])
                if commits is not None:
                    last = index + 1 == len(self.handle.blocks)
                    commits.commit(index, block, None if last else inputs, kwargs, self.run_state, self.recipe.steps)
                if sink is not None:
                    sink.write_module(prefix, block)
                    self.handle.release(block)
                    self.live_blocks.discard(index)
                else:
                    block.to("cpu")

    def count_routed_tokens(self, prefix: str, block: nn.Module, inputs, kwargs) -> None:
        """Mixture-of-experts blocks: the calibration tokens the router sends each expert, in the report (and a
        warning naming the experts below ``calibration.min_expert_tokens``), once per run."""
        adapter = self.handle.adapter
        path = f"{prefix}.{adapter.experts.experts}" if adapter.experts is not None else None
        if path is None or any(row["module"] == path and "tokens_per_expert" in row for row in self.report.rows):
            return
        with calibrating(adapter, block) as counts:
            if counts is not None:
                run_block(block, inputs, kwargs)
        if counts is not None:
            report_census(self.report, prefix, adapter, counts, self.recipe.calibration.min_expert_tokens)

    def count_routed_tokens_of_model(self, runner: BlockwiseModel) -> None:
        """``count_routed_tokens`` for a run whose first calibrated step is a model step: one forward pass of the
        calibration tokens through the whole model, once per run."""
        adapter = self.handle.adapter
        if adapter.experts is None or any("tokens_per_expert" in row for row in self.report.rows):
            return
        with ExitStack() as stack:
            counts = [stack.enter_context(calibrating(adapter, block)) for block in self.handle.blocks]
            for batch in self.calibration_tokens().split(self.batch_size):
                runner.logits(batch)
        threshold = self.recipe.calibration.min_expert_tokens
        for index, block_counts in enumerate(counts):
            if block_counts is not None:
                report_census(self.report, self.handle.block_prefix(index), adapter, block_counts, threshold)

    def run_model_step(self, step: Step, prepare: bool = False) -> None:
        """A model step's ``compress_model``, or (``prepare``) a layer step's ``prepare_model``, on the whole model."""
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
        if step.needs_calibration:
            self.count_routed_tokens_of_model(runner)
        run = step.prepare_model if prepare else step.compress_model
        run(
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
            # several processes: each holds only its share of the samples (compressor/distributed.py)
            self._tokens = self.distributed.shard(calibration_tokens(self.tokenizer, self.recipe.calibration))
        return self._tokens

    @torch.no_grad()
    def capture_block_inputs(self) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """Embed the calibration tokens and catch what the model hands its first block (hidden states, one
        tensor per batch) and every block (keyword arguments: ``kwargs[block][batch]``)."""
        embed = self.handle.adapter.embed_tokens
        # an embedding a model step left materialized holds its changes (rotate): keep it, do not reload it
        held = not any(p.is_meta for p in self.handle.model.get_submodule(embed).parameters())
        self.handle.materialize(embed, self.device, self.compute_dtype)
        base_model = self.handle.base_model
        for buffer_owner in base_model.modules():
            for name, buffer in buffer_owner.named_buffers(recurse=False):
                if buffer.device != self.device and not buffer.is_meta:
                    setattr(buffer_owner, name, buffer.to(self.device))
        captured_inputs, captured_kwargs = [], [[] for _ in self.handle.blocks]
        for batch in self.calibration_tokens().split(self.batch_size):
            hidden, kwargs = catch_block_inputs(base_model, self.handle.blocks, batch.to(self.device))
            captured_inputs.append(hidden)
            for index, block_kwargs in enumerate(kwargs):
                captured_kwargs[index].append(block_kwargs)
        if not held:
            self.handle.release(self.handle.model.get_submodule(embed))
        self.activation_bytes = sum(hidden.numel() * hidden.element_size() for hidden in captured_inputs)
        return captured_inputs, captured_kwargs

    def run_block(self, block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        return run_block(block, inputs, kwargs)


def describe_adapter(adapter) -> str:
    """The report's line on how the model was read: its family's adapter, or the generic one and what its probe
    found."""
    if not adapter.generic:
        return f"{adapter.family} (hand-written adapter)"
    groups = ", ".join(f"{adapter.norms[n]} -> {'/'.join(roles)}" for n, roles in adapter.norm_inputs.items())
    raw = ", ".join(f"residual stream -> {'/'.join(roles)}" for roles in adapter.raw_inputs)
    found = ", ".join(filter(None, (groups, raw)))
    return f"{adapter.family} (no hand-written adapter: the generic one, confirmed by a probe: {found})"


def has_native_type(family: str) -> bool:
    from compressor.arch.shipped import architecture

    return architecture("native").model_type_for(family) is not None


def step_passes(steps: list[Step]) -> list[tuple[str, list[Step]]]:
    """Group consecutive layer steps into one pass; each model step is a pass of its own."""
    passes: list[tuple[str, list[Step]]] = []
    for step in steps:
        if step.kind == "layer" and passes and passes[-1][0] == "layer":
            passes[-1][1].append(step)
        else:
            passes.append((step.kind, [step]))
    return passes


def resumable(steps: list[Step]) -> bool:
    """Whether ``--resume`` can continue an interrupted run of ``steps``: one layer pass (finished blocks are
    committed), or a model step that commits its training progress (the steps before it run again)."""
    return one_layer_pass(steps) or any(step.kind == "model" and step.commits_progress for step in steps)


def one_layer_pass(steps: list[Step]) -> bool:
    """Whether the steps form one layer pass (the recipes whose finished blocks are committed for --resume)."""
    passes = step_passes(steps)
    return len(passes) == 1 and passes[0][0] == "layer"
