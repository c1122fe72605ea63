"""Writing a compressed model as a checkpoint that serving engines load, atomically.

The writer receives finished modules as the session produces them (``write_module``), turns each
``QuantizedLinear`` into its checkpoint tensors and streams everything into safetensors shards in a
temporary folder beside the output. ``finish`` adds the config (with ``quantization_config``), the
tokenizer, the generation config, the recipe and the report, then renames the folder into place.
A failure at any point leaves no output folder behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.export import compressed_tensors as ct
from compressor.export import native
from compressor.export.shards import ShardWriter, parse_size
from compressor.weights.linear import QuantizedLinear

FORMAT_VERSION = "compressor-export-v1"
# Travels unchanged from the input model: tokenizer and generation settings.
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)


class ExportError(ValueError):
    pass


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False, protected: list[Path] = ()):
    """Yield a temporary folder that becomes ``output`` only if the block completes."""
    output = Path(output).resolve()
    for path in protected:
        path = Path(path).resolve()
        if output == path or path in output.parents or output in path.parents:
            raise ExportError(f"{output}: the output must not be, contain or lie inside the input model folder {path}")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if output.exists():
        retired = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(retired)
        temporary.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        temporary.rename(output)


class CheckpointWriter:
    def __init__(self, directory: Path, export_config, export_dtype: torch.dtype):
        self.directory = Path(directory)
        self.format = export_config.format
        self.dtype = export_dtype
        self.shards = ShardWriter(self.directory, parse_size(export_config.max_shard_size))
        self.schemes: dict[tuple, list[str]] = {}
        self.native_modules: dict[str, dict] = {}  # module name -> entry (export/native.py)
        self.dense_linears: list[str] = []
        self.quantized_parameters = 0
        self.quantized_bits = 0.0

    # --- tensors ---------------------------------------------------------------------------------

    def write_module(self, prefix: str, module: nn.Module) -> None:
        """Write every tensor of ``module`` (a block or any submodule) under ``prefix``."""
        quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}
        for name, child in module.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if name in quantized:
                self.write_quantized(full, child)
            elif isinstance(child, nn.Linear) and not any(name.startswith(f"{q}.") for q in quantized):
                self.dense_linears.append(full)
        for name, tensor in module.state_dict().items():
            owner = name.rpartition(".")[0]
            if owner in quantized and name != f"{owner}.bias":
                continue
            self.shards.add(f"{prefix}.{name}", tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def write_quantized(self, name: str, module: QuantizedLinear) -> None:
        weight = module.stored_weight
        self.quantized_parameters += weight.shape[0] * weight.shape[1]
        self.quantized_bits += weight.shape[0] * weight.shape[1] * weight.bits_per_weight()
        if self.format == "dense":
            self.shards.add(f"{name}.weight", weight.dequantize(self.dtype))
            return
        if weight.kind == "uniform" and self.format in ("auto", "compressed-tensors"):
            self.schemes.setdefault(ct.scheme_key(weight), []).append(name)
            tensors = ct.uniform_to_ct_tensors(weight, self.dtype)
        elif native.supports(weight) and self.format in ("auto", "compressor"):
            self.native_modules[name] = native.module_entry(weight)
            tensors = native.to_tensors(weight)
        else:
            raise ExportError(f"{name}: no checkpoint format for '{weight.kind}' weights in export format '{self.format}'")
        if self.schemes and self.native_modules:
            raise ExportError(f"{name}: uniform and lookup-table weights cannot share one checkpoint; use export format 'dense'")
        for suffix, tensor in tensors.items():
            self.shards.add(f"{name}.{suffix}", tensor)

    # --- the rest of the folder ------------------------------------------------------------------

    def finish(self, handle, recipe, report, architecture=None) -> dict:
        """Write the modules outside the blocks, the config, tokenizer, recipe and report.

        ``architecture`` (``compressor.arch.ExportArchitecture``), when a step changed the model's
        architecture: its config is written instead of the input's, with its modeling files and
        ``auto_map``."""
        from compressor.version import __version__

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
        files = self.shards.close()

        config = copy.deepcopy(architecture.config if architecture is not None else handle.config)
        config.dtype = self.dtype
        if architecture is not None and architecture.modeling_files:
            for file, source in architecture.modeling_files.items():
                (self.directory / file).write_text(source)
            config.auto_map = dict(architecture.auto_map)
        if self.schemes:
            config.quantization_config = ct.quantization_config(self.schemes, self.dense_linears)
        elif self.native_modules:
            config.quantization_config = native.quantization_config(self.native_modules, self.dense_linears)
        config.save_pretrained(self.directory)
        for file in COPIED_FILES:
            if (handle.path / file).is_file():
                shutil.copy(handle.path / file, self.directory / file)

        summary = {
            "format": "compressed-tensors" if self.schemes else native.QUANT_METHOD if self.native_modules else "dense",
            "files": files,
            "size_bytes": sum((self.directory / f).stat().st_size for f in files),
            "quantized_parameters": self.quantized_parameters,
            "bits_per_weight": round(self.quantized_bits / self.quantized_parameters, 4) if self.quantized_parameters else None,
        }
        report.summary.update(summary)
        provenance = {
            "format_version": FORMAT_VERSION,
            "compressor_version": __version__,
            "source_model": str(handle.path),
            "packing": "ct-dense-v1" if self.schemes else native.PACKING if self.native_modules else None,
            "compressed_tensors_min": ct.CT_MIN_VERSION if self.schemes else None,
            "versions": library_versions(),
        }
        (self.directory / "compressor.json").write_text(json.dumps(provenance, indent=2))
        (self.directory / "recipe.yaml").write_text(recipe.to_yaml())
        (self.directory / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        return summary


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "compressed-tensors", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
