"""Our native checkpoint format (``quant_method: "compressor"``) and the export codec of what
compressed-tensors cannot express: per-row lookup tables (SqueezeLLM) with optional sparse
full-precision outliers, and W+A quantized layers (uniform weights whose inputs are quantized per
token, optionally after a channel map: QLLM's reassembly, RTN W4A4), and block floating point (BFP);
it also carries a quantized KV cache's description (``kv_cache``, see ``compressor/kvcache/bfp.py``).

Spec: ``export/FORMATS.md`` ("Lookup-table weights"). Per quantized linear ``P`` (N outputs, K
inputs, b bits, K_pad = K rounded up to 32):

* ``P.weight_packed``  int32 [N, K_pad * b / 32]: the codes in the kernels' planes layout
  (``kernels/packing.py``), transposed to [N, .] so that a row-parallel shard is a slice;
* ``P.weight_lut``     [N, 2**b]: each row's codebook (fp16 unless the recipe chose fp32);
* ``P.weight_shape``   int64 [2] = (N, K);
* with outliers: ``P.weight_outlier_crow`` int32 [N + 1], ``P.weight_outlier_col`` int32 [nnz],
  ``P.weight_outlier_val`` [nnz] (same dtype as the LUT): W = LUT part + CSR part.

BFP weights (``export/FORMATS.md``, "Block floating point"): ``P.weight_packed`` int32 the unsigned
mantissas ``u = M + 2**(m-1)`` in the same planes layout, transposed; ``P.weight_exponent`` uint8
[N, ceil(K / n)] (``e = E + 127``, 0 = all-zero block); ``P.weight_shape``.

Uniform weights (spec: ``export/FORMATS.md``, "W+A layers"): ``P.weight_packed`` (planes, as above),
``P.weight_scale`` [N, G], ``P.weight_zero_point`` int32 [N, G] (asymmetric only, unsigned domain),
``P.weight_shape``. A layer whose input is transformed or quantized adds ``P.input_map_crow`` int32
[K + 1], ``P.input_map_col`` int32 [nnz], ``P.input_map_val`` fp32 [nnz] (CSR of x'' = P x, row = new
channel) and its entry's ``input_activations`` (per-token dynamic spec); attention modules whose Q, K, V
are quantized are listed in the config's ``attention_activations`` (module name -> spec).

``quantization_config`` lists every quantized module with its kind, bits and outlier count, so a
loader can build the modules with the right shapes before reading any tensor.
"""

from __future__ import annotations

import torch

from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.weights.activations import ActivationSpec, ChannelMap, install_attention_quantization
from compressor.weights.formats import BFPWeight, DenseAndSparseWeight, LUTWeight, SparseOutliers, UniformWeight, num_groups

QUANT_METHOD = "compressor"
FORMAT_VERSION = 1
PACKING = "planes-v1"
KINDS = ("lut", "dense_and_sparse", "uniform", "bfp")  # value kinds this format stores (dense_and_sparse with a LUT base)
PACKED = "weight_packed"  # the tensor every quantized module has (how a loader recognises one)
PROVENANCE = {"packing": PACKING, "compressed_tensors_min": None}  # what compressor.json records


def supports(weight) -> bool:
    """Lookup tables (with or without outliers); uniform weights only come here with quantized inputs
    (``codecs.codec_for``), plain ones go to compressed-tensors."""
    return weight.kind in ("lut", "uniform", "bfp") or (weight.kind == "dense_and_sparse" and weight.base_kind == "lut")


def module_entry(weight) -> dict:
    """What a loader needs to know about one module before reading its tensors."""
    if weight.kind == "bfp":
        return {"kind": "bfp", "bits": weight.mantissa_bits, "block_size": weight.block_size}
    if weight.kind == "uniform":
        return {"kind": "uniform", "bits": weight.bits, "group_size": weight.group_size, "symmetric": weight.symmetric, "outliers": 0}
    nnz = weight.outlier_col.numel() if weight.kind == "dense_and_sparse" else 0
    return {"kind": "lut", "bits": weight.bits, "outliers": nnz}


def inputs_entry(module) -> dict:
    """The entry keys of a ``QuantizedLinear``'s input side: its activation spec and channel-map size."""
    spec, channel_map = module.input_activations, module.channel_map
    return {"input_activations": None if spec is None else spec.to_config(), "input_map": 0 if channel_map is None else channel_map.nnz}


def input_tensors(module) -> dict[str, torch.Tensor]:
    channel_map = module.channel_map
    if channel_map is None:
        return {}
    return {"input_map_crow": channel_map.crow.to(torch.int32), "input_map_col": channel_map.col.to(torch.int32),
            "input_map_val": channel_map.val.to(torch.float32)}


def attach_inputs(module, tensors: dict[str, torch.Tensor], entry: dict) -> None:
    """Give a loaded ``QuantizedLinear`` its input side back (spec and channel map) from its entry and tensors."""
    spec = ActivationSpec.from_config(entry.get("input_activations"))
    channel_map = None
    if entry.get("input_map", 0):
        channel_map = ChannelMap(tensors["input_map_crow"].to(torch.int32), tensors["input_map_col"].to(torch.int32),
                                 tensors["input_map_val"].float(), module.in_features)
    if spec is not None or channel_map is not None:
        module.quantize_inputs(spec, channel_map)


def install_attention(model, quantization_config: dict) -> None:
    """Quantize Q, K, V of the attention modules the config lists (``attention_activations``)."""
    for name, entry in (quantization_config.get("attention_activations") or {}).items():
        install_attention_quantization(model.get_submodule(name), ActivationSpec.from_config(entry))


def to_tensors(weight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a LUT (or LUT + outliers) weight, names without the module prefix.
    Codebooks and outlier values keep the dtype the quantizer stored them in (``scale_dtype``: the
    scales of uniform weights)."""
    if weight.kind == "bfp":
        return {"weight_packed": pack_codes(weight.mantissas, weight.mantissa_bits).t().contiguous(),
                "weight_exponent": weight.exponents.to(torch.uint8).contiguous(),
                "weight_shape": torch.tensor(weight.shape, dtype=torch.int64)}
    if weight.kind == "uniform":
        tensors = {
            "weight_packed": pack_codes(weight.codes, weight.bits).t().contiguous(),
            "weight_scale": weight.scales.to(scale_dtype or weight.scales.dtype),
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
        if weight.zeros is not None:
            tensors["weight_zero_point"] = weight.zeros.to(torch.int32)
        return tensors
    tensors = {
        "weight_packed": pack_codes(weight.codes, weight.bits).t().contiguous(),
        "weight_lut": weight.lut,
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }
    if weight.kind == "dense_and_sparse":
        tensors.update(weight_outlier_crow=weight.outlier_crow.to(torch.int32), weight_outlier_col=weight.outlier_col.to(torch.int32),
                       weight_outlier_val=weight.outlier_val)
    return tensors


def tensor_shapes(entry: dict, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype class ("int32", "int64", "uint8", "float") of each tensor of a module, from its entry."""
    n, k = shape
    bits = entry["bits"]
    padded = -(-k // 32) * 32
    if entry.get("kind") == "bfp":
        return {"weight_packed": ((n, padded * bits // 32), "int32"), "weight_exponent": ((n, -(-k // entry["block_size"])), "uint8"),
                "weight_shape": ((2,), "int64")}
    shapes = {"weight_packed": ((n, padded * bits // 32), "int32"), "weight_shape": ((2,), "int64")}
    if entry.get("input_map", 0):
        nnz = entry["input_map"]
        shapes.update(input_map_crow=((k + 1,), "int32"), input_map_col=((nnz,), "int32"), input_map_val=((nnz,), "float32"))
    if entry.get("kind", "lut") == "uniform":
        groups = num_groups(k, entry["group_size"])
        shapes["weight_scale"] = ((n, groups), "float")
        if not entry["symmetric"]:
            shapes["weight_zero_point"] = ((n, groups), "int32")
        return shapes
    shapes["weight_lut"] = ((n, 2**bits), "float")
    if entry.get("outliers", 0):
        nnz = entry["outliers"]
        shapes.update(weight_outlier_crow=((n + 1,), "int32"), weight_outlier_col=((nnz,), "int32"), weight_outlier_val=((nnz,), "float"))
    return shapes


def from_tensors(tensors: dict[str, torch.Tensor], entry: dict) -> LUTWeight | DenseAndSparseWeight | UniformWeight | BFPWeight:
    """Inverse of ``to_tensors`` (checks the shapes against the config entry)."""
    n, k = (int(v) for v in tensors["weight_shape"])
    for name, (shape, _) in tensor_shapes(entry, (n, k)).items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    bits = entry["bits"]
    codes = unpack_codes(tensors["weight_packed"].t(), bits, (n, k))
    if entry.get("kind") == "bfp":
        return BFPWeight(codes, tensors["weight_exponent"].to(torch.uint8), bits, entry["block_size"])
    if entry.get("kind", "lut") == "uniform":
        zeros = tensors.get("weight_zero_point")
        return UniformWeight(codes=codes, scales=tensors["weight_scale"], zeros=None if zeros is None else zeros.to(torch.int32),
                             bits=bits, group_size=entry["group_size"])
    base = LUTWeight(codes=codes, lut=tensors["weight_lut"], bits=bits)
    if not entry.get("outliers", 0):
        return base
    outliers = SparseOutliers(crow=tensors["weight_outlier_crow"], col=tensors["weight_outlier_col"],
                              val=tensors["weight_outlier_val"], shape=(n, k))
    return DenseAndSparseWeight.from_parts(base, outliers)


def read_module(tensors: dict[str, torch.Tensor], quantization_config: dict, name: str, dtype: torch.dtype | None = None):
    """Module ``name``'s value from its checkpoint tensors (LUTs keep their stored dtype)."""
    return from_tensors(tensors, quantization_config["modules"][name])


def checkpoint_format(modules: dict[str, dict]) -> str:
    """The config's ``format``: the kind of every module ("lut", "uniform", "bfp"), "mixed", or "kv_cache" with no module."""
    kinds = {entry.get("kind", "lut") for entry in modules.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "kv_cache"


FORMATS = ("lut", "uniform", "bfp", "mixed", "kv_cache")


def quantization_config(modules: dict[str, dict], ignore: list[str], attention: dict | None = None) -> dict:
    """``attention``: attention module name -> its Q/K/V activation spec (config form)."""
    bits = sorted({entry["bits"] for entry in modules.values()})
    extra = {"attention_activations": dict(sorted(attention.items()))} if attention else {}
    return {
        "quant_method": QUANT_METHOD,
        "format": checkpoint_format(modules),
        "version": FORMAT_VERSION,
        "packing": PACKING,
        "bits": bits[0] if len(bits) == 1 else bits,
        "outliers": any(entry.get("outliers", 0) for entry in modules.values()),
        "ignore": sorted(ignore),
        "modules": dict(sorted(modules.items())),
        **extra,
    }
