"""Loading a causal LM without holding more of it than the work needs.

``ModelHandle.open`` builds the transformers model as a skeleton whose parameters live on the meta
device (buffers such as rotary frequencies are real), and reads tensors from the checkpoint's
safetensors files only when a module is materialized. The pipeline materializes one decoder block
at a time; the input checkpoint is only ever read.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.arch import ArchAdapter, UnsupportedArchitecture, adapter_for
from compressor.arch.generic import adapter_of
from compressor.arch.shipped import shipped_for
from compressor.errors import UserError
from compressor.moe import FusedSlice, checkpoint_name, fused_slice, stores_fused, unfuse_experts

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]


class ModelLoadError(UserError):
    pass


def resolve_model_path(model: str | Path) -> Path:
    """``demo``, ``demo-moe``, a local folder holding a transformers checkpoint, or a Hugging Face hub id."""
    if str(model) == "demo":
        from compressor.demo import demo_model_dir

        return demo_model_dir()
    if str(model) == "demo-moe":
        from compressor.demo import demo_moe_dir

        return demo_moe_dir()
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a transformers checkpoint (no config.json)")
        return path
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise ModelLoadError(f"{model}: no such model folder (nor a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated repo...
        reason = " ".join(str(error).split())  # one line, whatever the hub client said
        raise ModelLoadError(f"{model}: could not download from the hub ({type(error).__name__}: {reason})") from None


FLOAT_STORAGE = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors dtypes we read as weights


@contextmanager
def transformers_says(path: Path):
    """What transformers refuses in a checkpoint's config or code, as one ``ModelLoadError`` line."""
    try:
        yield
    except UserError:  # already one line of ours (a damaged shard, say)
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = " ".join(str(error).split())
        if "trust_remote_code" in reason:
            raise ModelLoadError(
                f"{path}: the model needs its own code to load; pass --trust-remote-code if you trust it"
            ) from None
        raise ModelLoadError(f"{path}: could not read the model ({type(error).__name__}: {reason[:300]})") from None


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config.json's dtype {getattr(config, 'dtype', None)!r} is not a floating-point torch dtype")
    return dtype


def safetensors_index(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file holding it."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no .safetensors files (only safetensors checkpoints are supported)")
    index = {}
    for file in files:
        with open_safetensors(file) as f:
            index.update({name: file for name in f.keys()})
    return index


@contextmanager
def open_safetensors(file: Path):
    """``safe_open``, with a damaged file (truncated, not safetensors) reported in one line."""
    try:
        handle = safe_open(file, "pt")
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        reason = " ".join(str(error).split())
        raise ModelLoadError(
            f"{file}: not a readable safetensors file ({type(error).__name__}: {reason}); is the download complete?"
        ) from None
    with handle as f:
        yield f


@dataclass
class ModelHandle:
    path: Path
    config: object
    adapter: ArchAdapter
    model: nn.Module  # skeleton: parameters on meta until materialized
    tensor_files: dict[str, Path]
    dtype: torch.dtype  # the checkpoint's dtype

    @property
    def fused_experts(self) -> bool:
        """Whether the checkpoint keeps the experts as transformers 5's fused 3-D tensors (``compressor.moe``)."""
        return stores_fused(self.adapter, self.tensor_files)

    @classmethod
    def open(cls, model: str | Path, trust_remote_code: bool = False) -> ModelHandle:
        path = resolve_model_path(model)
        with transformers_says(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None) is not None:
            raise ModelLoadError(
                f"{path}: already quantized (quantization_config in config.json); start from the unquantized model"
            )
        try:
            adapter = adapter_for(config)
        except UnsupportedArchitecture:
            adapter = None  # no row: the generic adapter reads the skeleton (arch/generic.py)
        if not getattr(config, "num_hidden_layers", 1) or config.num_hidden_layers < 1:
            raise ModelLoadError(f"{path}: config.json says num_hidden_layers {config.num_hidden_layers}: no blocks")
        shipped = shipped_for(config.model_type)
        if shipped is not None and not shipped.compressible:
            raise UnsupportedArchitecture(
                f"{path}: a {config.model_type} checkpoint (one of our exports) cannot be compressed again; start from "
                "the model it was made from"
            )
        with transformers_says(path), init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            dtype = checkpoint_dtype(config)
        skeleton.eval()
        skeleton.requires_grad_(False)
        if adapter is None:
            adapter = adapter_of(skeleton, config)
        for block in skeleton.get_submodule(adapter.blocks):
            unfuse_experts(block, adapter, config)  # per-expert linears instead of fused 3-D parameters
        handle = cls(path, config, adapter, skeleton, safetensors_index(path), dtype)
        handle.check_tensors()
        return handle

    def check_tensors(self) -> None:
        """Every parameter's tensor is in the checkpoint with the shape the config implies, in a floating
        dtype (read from the files' headers, before any work): a config that disagrees with its weights is
        one line naming the first tensor, not an error deep inside a step."""
        by_file: dict[Path, list[tuple[str, tuple]]] = {}
        for name, parameter in self.model.named_parameters():
            by_file.setdefault(self.tensor_files[self.stored_as(name)[0]], []).append((name, tuple(parameter.shape)))
        for file, expected in by_file.items():
            with open_safetensors(file) as f:
                for name, shape in expected:
                    key, part = self.stored_as(name)
                    stored = f.get_slice(key)
                    found = tuple(stored.get_shape())
                    if part is not None and (len(found) != 3 or found[0] <= part.expert):
                        raise ModelLoadError(f"{file}: {key} has shape {found}, not [experts, rows, columns]")
                    found = found if part is None else part.shape(found)
                    if found != shape:
                        raise ModelLoadError(f"{file}: {name} has shape {found}, but config.json implies {shape}")
                    if stored.get_dtype() not in FLOAT_STORAGE:
                        raise ModelLoadError(f"{file}: {name} is stored as {stored.get_dtype()}, not floating point")

    # --- structure -----------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.adapter.blocks)

    @property
    def base_model(self) -> nn.Module:
        """The module that embeds the tokens and calls the blocks (e.g. ``model`` of a Llama)."""
        return self.model.get_submodule(self.adapter.blocks.rpartition(".")[0])

    def block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks}.{index}"

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def outside_block_modules(self) -> dict[str, nn.Module]:
        """Embedding, final norm and LM head: what a forward pass needs besides the blocks; and any
        other module with parameters that a step added beside the blocks (SwiftKV's ``norm_swiftkv``)."""
        names = [self.adapter.embed_tokens, self.adapter.final_norm, self.adapter.lm_head]
        base = self.adapter.blocks.rpartition(".")[0]
        for name, child in self.base_model.named_children():
            full = f"{base}.{name}" if base else name
            if full not in names and full != self.adapter.blocks and next(child.parameters(), None) is not None:
                names.append(full)
        return {name: self.model.get_submodule(name) for name in names}

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of every parameter with floating ones in ``dtype`` (integer codes keep their size)."""
        element = torch.tensor([], dtype=dtype).element_size()
        return sum(
            p.numel() * (element if p.is_floating_point() else p.element_size()) for p in self.model.parameters()
        )

    def export_bytes(self, dtype: torch.dtype, bits: int | None, kept: float = 1.0) -> int:
        """About what a checkpoint of this model takes: block linears at ``bits`` per weight (None: dense), a
        ``kept`` fraction of them, every other parameter in ``dtype``."""
        element = torch.tensor([], dtype=dtype).element_size()
        linear = sum(
            m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear) and m.weight is not None
        )
        total = sum(p.numel() for p in self.model.parameters())
        return (total - linear) * element + int(kept * linear * (bits if bits is not None else 8 * element)) // 8

    def fits_on(self, device: torch.device, dtype: torch.dtype, fraction: float = 0.8) -> bool:
        """Whether the weights in ``dtype`` take at most ``fraction`` of the device's free memory
        (always true off CUDA: there the blocks have nowhere else to go)."""
        if torch.device(device).type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return self.weight_bytes(dtype) <= fraction * free

    # --- reading tensors -----------------------------------------------------------------------

    def checkpoint_name(self, name: str) -> str:
        """The name under which ``name`` is stored (a tied LM head is stored as the embedding; experts
        under their checkpoint names, ``compressor.moe.checkpoint_name``, or transformers' own names in a
        checkpoint that transformers 5 wrote in its fused layout)."""
        renamed = checkpoint_name(self.adapter, name)
        if renamed in self.tensor_files:
            return renamed
        if name in self.tensor_files:
            return name
        if self.tied_embeddings and name == f"{self.adapter.lm_head}.weight":
            return f"{self.adapter.embed_tokens}.weight"
        raise ModelLoadError(f"{self.path}: tensor '{renamed}' is missing from the checkpoint")

    def stored_as(self, name: str) -> tuple[str, FusedSlice | None]:
        """The checkpoint tensor holding ``name`` and, for an expert weight of a fused layer, its slice of it."""
        part = fused_slice(self.adapter, name, self.tensor_files)
        return (part.name, part) if part is not None else (self.checkpoint_name(name), None)

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors by module name, opening each safetensors file once; an expert of a fused layer is read
        as its slice alone (the fused tensor is never loaded)."""
        by_file: dict[Path, list[tuple[str, str, FusedSlice | None]]] = {}
        for name in names:
            key, part = self.stored_as(name)
            by_file.setdefault(self.tensor_files[key], []).append((name, key, part))
        tensors = {}
        for file, stored in by_file.items():
            with open_safetensors(file) as f:
                for name, key, part in stored:
                    if part is None:
                        tensors[name] = f.get_tensor(key)
                    else:
                        fused = f.get_slice(key)
                        tensors[name] = fused[part.index(fused.get_shape())]
        return tensors

    def original_block(self, index: int, device, dtype: torch.dtype) -> nn.Module:
        """A new copy of block ``index`` with the checkpoint's weights; the model's own block (which a
        step may have changed already) is not touched."""
        with init_empty_weights(include_buffers=False):
            block = unfuse_experts(type(self.blocks[index])(self.model.config, index), self.adapter, self.config)
        prefix = self.block_prefix(index)
        names = [name for name, _ in block.named_parameters()]
        tensors = self.read_tensors([f"{prefix}.{name}" for name in names])
        for name in names:
            set_module_tensor_to_device(block, name, device, value=tensors[f"{prefix}.{name}"], dtype=dtype)
        self.load_stored_buffers(block, prefix, device)
        return block.eval().requires_grad_(False)

    def load_stored_buffers(self, module: nn.Module, prefix: str, device) -> None:
        """Buffers the checkpoint stores (DeepSeek-V3's ``e_score_correction_bias``), in their own dtype: the
        skeleton built them with their initial values."""
        stored = {}
        for name, _ in module.named_buffers():
            full = f"{prefix}.{name}"
            if checkpoint_name(self.adapter, full) in self.tensor_files or full in self.tensor_files:
                stored[name] = full
        if stored:
            tensors = self.read_tensors(list(stored.values()))
            for name, full in stored.items():
                set_module_tensor_to_device(module, name, device, value=tensors[full])

    def materialize(self, prefix: str, device, dtype: torch.dtype) -> nn.Module:
        """Load the parameters of the module at ``prefix`` from the checkpoint onto ``device``; a tensor
        holding NaN or infinity is refused (its scales would be NaN without a word)."""
        module = self.model.get_submodule(prefix)
        names = [name for name, p in module.named_parameters() if p.device.type == "meta"]
        tensors = self.read_tensors([f"{prefix}.{name}" for name in names])
        broken = next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if broken is not None:
            raise ModelLoadError(f"{self.path}: tensor {broken} holds NaN or infinite values")
        for name in names:
            set_module_tensor_to_device(module, name, device, value=tensors[f"{prefix}.{name}"], dtype=dtype)
        self.load_stored_buffers(module, prefix, device)
        return module

    def materialize_all(self, device, dtype: torch.dtype, block_device=None) -> nn.Module:
        """The whole model; the blocks on ``block_device`` if given (CPU, for offloaded runs)."""
        for name in self.outside_block_modules():
            self.materialize(name, device, dtype)
        for index in range(len(self.blocks)):
            self.materialize(self.block_prefix(index), block_device or device, dtype)
        if self.tied_embeddings:
            self.model.tie_weights()
        return self.model

    @staticmethod
    def release(module: nn.Module) -> None:
        """Free a module's tensors (back to the meta device) and hand the memory back to the OS."""
        module.to("meta")
        return_freed_memory()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """glibc keeps freed heap pages in its arenas, so a process that frees one block and then loads
    the next still grows with every block; trimming the arenas keeps it flat."""
    if sys.platform.startswith("linux") and _libc() is not None:
        _libc().malloc_trim(0)
