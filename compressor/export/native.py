"""Our native checkpoint format (``quant_method: "compressor"``): the codec of what compressed-tensors
cannot express. Each weight kind is one layout in ``LAYOUTS`` (``export/layouts/``: lookup tables with or
without outliers, BFP, and uniform or float weights of W+A layers); a layer's input side (activation quantization,
channel maps) is one more layout (``INPUTS``), independent of the weight kind. It also carries a quantized
KV cache's description (``kv_cache``, see ``compressor/kvcache``). Spec: ``export/FORMATS.md``.

``quantization_config`` lists every quantized module with its entry (kind, bits, ...), so a loader can
build the modules with the right shapes before reading any tensor.
"""

from __future__ import annotations

import torch

from compressor.export.layouts import TensorSpec, bfp, check_tensors, inputs, lut, uniform
from compressor.export.layouts import float as float_layout

QUANT_METHOD = "compressor"
FORMAT_VERSION = 1
PACKING = "planes-v1"
PACKED = "weight_packed"  # the tensor every quantized module has (how a loader recognises one)
PROVENANCE = {"packing": PACKING, "compressed_tensors_min": None}  # what compressor.json records
# entry kind -> layout
LAYOUTS = {layout.kind: layout for layout in (lut.LAYOUT, uniform.LAYOUT, bfp.LAYOUT, float_layout.LAYOUT)}
INPUTS = inputs.LAYOUT
UNKINDED_ENTRY = "lut"  # the kind of an entry without one (lookup tables were the format's first kind)
FORMATS = (*LAYOUTS, "mixed", "kv_cache")  # the config's ``format``: one kind, several, or a KV cache alone


def layout_for(weight):
    """The layout that writes ``weight`` (None: the format does not store it)."""
    return next((layout for layout in LAYOUTS.values() if layout.stores(weight)), None)


def supports(weight, quantized_inputs: bool = False) -> bool:
    """Whether this format stores ``weight`` (some layouts only for a layer whose inputs are quantized)."""
    layout = layout_for(weight)
    return layout is not None and (quantized_inputs or not layout.only_with_inputs)


def entry_layout(entry: dict):
    kind = entry.get("kind", UNKINDED_ENTRY)
    if kind not in LAYOUTS:
        raise ValueError(
            f"weight kind {kind!r} is not one this compressor reads ({', '.join(LAYOUTS)}); upgrade compressor"
        )
    return LAYOUTS[kind]


def module_entry(weight) -> dict:
    """What a loader needs to know about one module before reading its tensors."""
    return layout_for(weight).entry(weight)


def to_tensors(weight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``weight``, names without the module prefix. Codebooks and outlier values
    keep the dtype the quantizer stored them in (``scale_dtype``: the scales of uniform weights)."""
    return layout_for(weight).tensors(weight, scale_dtype)


def tensor_specs(entry: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """Shape and dtype of each tensor of a module (weight and input side), from its entry."""
    return {**entry_layout(entry).tensor_specs(entry, shape), **INPUTS.tensor_specs(entry, shape)}


def from_tensors(tensors: dict[str, torch.Tensor], entry: dict):
    """Inverse of ``to_tensors`` (checks the shapes against the config entry)."""
    n, k = (int(v) for v in tensors["weight_shape"])
    check_tensors(tensors, tensor_specs(entry, (n, k)))
    return entry_layout(entry).read(tensors, entry)


def input_entry(quantization_config: dict, name: str) -> dict:
    """What the input side (``INPUTS``) reads of module ``name``: its entry."""
    return quantization_config["modules"][name]


def read_module(
    tensors: dict[str, torch.Tensor], quantization_config: dict, name: str, dtype: torch.dtype | None = None
):
    """Module ``name``'s value from its checkpoint tensors (LUTs keep their stored dtype)."""
    return from_tensors(tensors, quantization_config["modules"][name])


def checkpoint_format(modules: dict[str, dict]) -> str:
    """The config's ``format``: the kind of every module, "mixed", or "kv_cache" with no module."""
    kinds = {entry.get("kind", UNKINDED_ENTRY) for entry in modules.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "kv_cache"


def quantization_config(
    modules: dict[str, dict], ignore: list[str], attention: dict | None = None, online_hadamard: dict | None = None
) -> dict:
    """``attention``: attention module name -> its Q/K/V activation spec (config form); ``online_hadamard``:
    MLP module name -> the order of its Hadamard factor (``compressor.modules.hadamard``, rotate's online
    transform before down_proj; the factor is the MLP's tensor ``online_hadamard``)."""
    bits = sorted({entry["bits"] for entry in modules.values()})
    return {
        "quant_method": QUANT_METHOD,
        "format": checkpoint_format(modules),
        "version": FORMAT_VERSION,
        "packing": PACKING,
        "bits": bits[0] if len(bits) == 1 else bits,
        "outliers": any(entry.get("outliers", 0) for entry in modules.values()),
        "ignore": sorted(ignore),
        "modules": dict(sorted(modules.items())),
        **INPUTS.config(attention or {}),
        **({"online_hadamard": dict(sorted(online_hadamard.items()))} if online_hadamard else {}),
    }
