"""Writing a compressed model as a checkpoint that serving engines load.

The writer receives finished modules as the session produces them (``write_module``), turns each
``QuantizedLinear`` into its checkpoint tensors with the codec of the export format and the layout of its
weight kind (``export/codecs.py``) and streams everything into safetensors shards in the temporary folder
that ``export/output.py`` puts in place once the run completes. ``finish`` adds the config (with
``quantization_config``), the tokenizer, the generation config, the recipe and the report.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.arch import ExportArchitecture
from compressor.arch.native import native_config
from compressor.declaration import ExportDeclaration
from compressor.export import compressed_tensors, gptq, native
from compressor.export.codecs import codec_for
from compressor.export.output import ExportError
from compressor.export.shards import ShardWriter
from compressor.modules.hadamard import OnlineHadamardMLP
from compressor.modules.linear import QuantizedLinear
from compressor.moe import RoutedExperts, fused_parts

FORMAT_VERSION = "compressor-export-v1"
# Travels unchanged from the input model: tokenizer and generation settings.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class CheckpointWriter:
    def __init__(
        self,
        directory: Path,
        export_config,
        export_dtype: torch.dtype,
        rename=None,
        fused_experts=False,
        gptq_first=False,
    ):
        self.directory = Path(directory)
        self.gptq_first = gptq_first  # export 'auto' writes asymmetric uniform weights as GPTQ (codecs.codec_for)
        # in-memory module name -> the checkpoint's (Mixtral's experts: compressor.moe.checkpoint_name)
        self.rename = rename or (lambda name: name)
        self.format = export_config.format
        # a dense export of a checkpoint that kept its experts fused keeps them fused (compressor/moe.py)
        self.fuse_experts = fused_experts and self.format == "dense"
        self.dtype = export_dtype
        self.shards = ShardWriter(self.directory, export_config.max_shard_bytes)
        self.codec = None  # the export codec of the quantized modules (export/codecs.py): one per checkpoint
        self.entries: dict[str, dict] = {}  # quantized module name -> its codec's entry
        self.attention: dict[str, dict] = {}  # attention modules whose Q, K, V are quantized -> spec
        self.online_hadamard: dict[str, int] = {}  # MLPs that rotate down_proj's input online -> factor order
        self.dense_linears: list[str] = []
        self.quantized_parameters = 0
        self.quantized_bits = 0.0

    # --- tensors ---------------------------------------------------------------------------------

    def write_module(self, prefix: str, module: nn.Module) -> None:
        """Write every tensor of ``module`` (a block or any submodule) under ``prefix``."""
        fused = []  # expert modules written as fused tensors: their own tensors are not written again
        if self.fuse_experts:
            for name, child in module.named_modules():
                if isinstance(child, RoutedExperts):
                    self.write_fused_experts(f"{prefix}.{name}" if name else prefix, child)
                    fused.append(f"{name}." if name else "")
        quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}
        for name, child in module.named_modules():
            if any(f"{name}.".startswith(experts) for experts in fused):
                continue
            full = self.rename(f"{prefix}.{name}" if name else prefix)
            if getattr(child, "activation_quantization", None) is not None:
                self.attention[full] = child.activation_quantization.to_config()
            if isinstance(child, OnlineHadamardMLP):
                self.online_hadamard[full] = child.online_hadamard.shape[0]
            if name in quantized:
                self.write_quantized(full, child)
            elif isinstance(child, nn.Linear) and not any(name.startswith(f"{q}.") for q in quantized):
                self.dense_linears.append(full)
        for name, tensor in module.state_dict().items():
            owner = name.rpartition(".")[0]
            if any(name.startswith(experts) for experts in fused):
                continue
            if owner in quantized and name != f"{owner}.bias":
                continue
            self.shards.add(
                self.rename(f"{prefix}.{name}"), tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            )

    def write_fused_experts(self, name: str, experts: RoutedExperts) -> None:
        """A layer's experts as the fused tensors the input checkpoint held, streamed expert by expert (a quantized
        expert dequantized, as a dense export writes every quantized linear)."""
        for index, expert in enumerate(experts):
            for linear in expert.projections():
                if isinstance(linear, QuantizedLinear):
                    self.count_quantized(f"{name}.{index}", linear)

        def weight(linear):
            return linear.stored_weight.dequantize(self.dtype) if isinstance(linear, QuantizedLinear) else linear.weight

        for suffix, shape, parts in fused_parts(experts, weight):
            self.shards.add_parts(f"{name}.{suffix}", shape, self.dtype, parts)

    def count_quantized(self, name: str, module: QuantizedLinear) -> None:
        """Count a quantized linear's weights for the summary; one whose inputs are quantized cannot be dense."""
        weight = module.stored_weight
        self.quantized_parameters += weight.shape[0] * weight.shape[1]
        self.quantized_bits += weight.shape[0] * weight.shape[1] * weight.bits_per_weight()
        if self.format == "dense" and module.quantizes_inputs:
            raise ExportError(
                f"{name}: its inputs are quantized or channel-mapped, which export format 'dense' cannot record; "
                "use 'auto'"
            )

    def write_quantized(self, name: str, module: QuantizedLinear) -> None:
        self.count_quantized(name, module)
        weight = module.stored_weight
        if self.format == "dense":
            self.shards.add(f"{name}.weight", weight.dequantize(self.dtype))
            return
        codec = codec_for(weight, self.format, module if module.quantizes_inputs else None, self.gptq_first)
        if codec is None:
            why = (
                f" ({gptq.shape_problem(weight)})"
                if self.format == gptq.QUANT_METHOD and gptq.shape_problem(weight)
                else ""
            )
            raise ExportError(
                f"{name}: no checkpoint format for '{weight.kind}' weights in export format '{self.format}'{why}"
            )
        if self.codec is not None and codec is not self.codec:
            raise ExportError(
                f"{name}: '{weight.kind}' weights ({codec.QUANT_METHOD}) cannot share one checkpoint with the "
                f"{self.codec.QUANT_METHOD} weights before them; use export format 'dense'"
            )
        self.codec = codec
        self.entries[name] = codec.module_entry(weight)
        tensors = codec.to_tensors(weight, self.dtype)
        if module.quantizes_inputs:
            self.entries[name].update(codec.INPUTS.entry(module))
            tensors.update(codec.INPUTS.tensors(module))
        for suffix, tensor in tensors.items():
            self.shards.add(f"{name}.{suffix}", tensor)

    # --- the rest of the folder ------------------------------------------------------------------

    def finish(self, handle, recipe, report, declared: ExportDeclaration | None = None) -> dict:
        """Write the modules outside the blocks, the config, tokenizer, recipe and report.

        ``declared``: what the steps declared besides the weights. Its ``architecture``, when a step
        changed it, is written instead of the input's config, with its modeling files and ``auto_map``;
        its ``kv_cache``, a quantized KV cache, becomes the ``kv_cache`` entry of the native format's
        ``quantization_config`` (which a checkpoint of dense or native weights then has;
        compressed-tensors weights cannot share a checkpoint with it)."""
        declared = declared or ExportDeclaration()
        files = self.write_outside_blocks(handle)
        config = self.export_config(handle, declared)
        config.save_pretrained(self.directory)
        for file in COPIED_FILES:
            if (handle.path / file).is_file():
                shutil.copy(handle.path / file, self.directory / file)
        summary = {
            "format": self.codec.QUANT_METHOD if self.codec is not None else "dense",
            "files": files,
            "size_bytes": sum((self.directory / f).stat().st_size for f in files),
            "quantized_parameters": self.quantized_parameters,
            "bits_per_weight": round(self.quantized_bits / self.quantized_parameters, 4)
            if self.quantized_parameters
            else None,
        }
        report.summary.update(summary)
        self.write_records(handle, recipe, report)
        return summary

    def write_outside_blocks(self, handle) -> list[str]:
        """The embeddings, final norm and head (tied heads once); closes the shards and returns their files."""
        skip = {f"{handle.adapter.lm_head}.weight"} if handle.tied_embeddings else set()
        blocks_prefix = f"{handle.adapter.blocks}."
        for name, module in handle.outside_block_modules().items():
            if any(p.is_meta for p in module.parameters()):
                handle.materialize(name, "cpu", self.dtype)
            if isinstance(module, nn.Linear):
                self.dense_linears.append(name)
            for tensor_name, tensor in module.state_dict().items():
                full = f"{name}.{tensor_name}"
                if full not in skip and not full.startswith(blocks_prefix):
                    self.shards.add(full, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
            handle.release(module)
        return self.shards.close()

    def export_config(self, handle, declared: ExportDeclaration):
        """The checkpoint's transformers config: the declared architecture's or the input's (a native-format
        checkpoint's under its own model type, ``arch/native``), with the modeling files written beside it
        and the ``quantization_config`` of the weights and KV cache."""
        kv_cache = declared.kv_cache_entry()
        self.settle_codec(kv_cache)
        architecture = self.architecture(handle, declared)
        config = copy.deepcopy(architecture.config if architecture is not None else handle.config)
        config.dtype = self.dtype
        if architecture is not None and architecture.modeling_files:
            for file, source in architecture.modeling_files.items():
                (self.directory / file).write_text(source)
            config.auto_map = dict(architecture.auto_map)
        if self.codec is not None:
            extra = {"attention": self.attention} if self.attention else {}
            if self.online_hadamard:
                extra["online_hadamard"] = self.online_hadamard
            try:
                config.quantization_config = self.codec.quantization_config(self.entries, self.dense_linears, **extra)
            except ValueError as error:
                raise ExportError(
                    f"export format '{self.codec.QUANT_METHOD}': {error}; use export format 'compressed-tensors' or "
                    "'dense'"
                ) from None
            if kv_cache is not None and self.codec is compressed_tensors:
                config.quantization_config["kv_cache_scheme"] = compressed_tensors.kv_cache_scheme(kv_cache)
            elif kv_cache is not None:
                config.quantization_config["kv_cache"] = kv_cache
        return config

    def settle_codec(self, kv_cache: dict | None) -> None:
        """A quantized KV cache (but an FP8 one beside compressed-tensors weights, ``kv_cache_scheme``) or quantized
        attention operands put the checkpoint in the native format."""
        if kv_cache is not None and not (
            self.codec is compressed_tensors and compressed_tensors.kv_cache_scheme(kv_cache) is not None
        ):
            if self.codec is not None and self.codec is not native:
                raise ExportError(
                    f"a quantized KV cache is declared in the native format; {self.codec.QUANT_METHOD} weights cannot "
                    "share its checkpoint (use export format 'dense', or quantize the weights with a native-format "
                    "method)"
                )
            self.codec = native
        if self.online_hadamard and self.codec is not native:
            raise ExportError(
                f"{next(iter(self.online_hadamard))}: its online Hadamard (rotate) needs the native format, which "
                "'auto' picks for W+A layers; quantize activations after rotate, or rotate with online_hadamard: false"
            )
        if self.attention and self.codec is not native:
            raise ExportError(
                f"{next(iter(self.attention))}: quantized attention operands need the native format ('auto' picks it "
                "for W+A layers)"
            )

    def architecture(self, handle, declared: ExportDeclaration) -> ExportArchitecture | None:
        """The architecture the config declares: a native-format checkpoint's own (so that nothing loads it
        without our quantizer), else what a step declared, else None (the input's)."""
        if self.codec is not native:
            return declared.architecture
        if declared.architecture is not None and declared.architecture.modeling_files:
            raise ExportError(
                f"native-format weights cannot share a checkpoint with {declared.architecture.config.model_type}'s "
                "shipped modeling code; quantize with a compressed-tensors method (rtn, efficientqat) or export "
                "'dense'"
            )
        base = declared.architecture.config if declared.architecture is not None else handle.config
        try:
            return ExportArchitecture.declared(native_config(base))
        except ValueError as error:
            raise ExportError(str(error)) from None

    def write_records(self, handle, recipe, report) -> None:
        """``compressor.json`` (versions and packing), the recipe and the report beside the weights."""
        from compressor.version import __version__

        provenance = {
            "format_version": FORMAT_VERSION,
            "compressor_version": __version__,
            "source_model": str(handle.path),
            **(self.codec.PROVENANCE if self.codec is not None else {"packing": None, "compressed_tensors_min": None}),
            "versions": library_versions(),
        }
        (self.directory / "compressor.json").write_text(json.dumps(provenance, indent=2))
        (self.directory / "recipe.yaml").write_text(recipe.to_yaml())
        (self.directory / "report.json").write_text(json.dumps(report.to_dict(), indent=2))


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "compressed-tensors", "safetensors", "gptqmodel", "optimum"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
