"""The export codec of uniform integer weights: compressed-tensors ``pack-quantized`` tensors and config.

Layout (see ``export/FORMATS.md``): per quantized linear ``weight_packed`` int32
[N, ceil(K*b/32)] (dense cross-element packing of compressed-tensors >= 0.18), ``weight_scale``
[N, G], ``weight_shape`` int64 [2], and for asymmetric weights ``weight_zero_point`` packed along
the output dim. Values are stored signed (``q = u - 2**(b-1)``); packing is done by
compressed-tensors' own ``pack_to_int32`` so the bits are exactly what its readers expect.
"""

from __future__ import annotations

import functools
import re

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compressor.export.layouts import inputs
from compressor.kernels.packing import PackedUniform, pack_uniform
from compressor.weights.values import (
    FLOAT_GRIDS,
    FloatWeight,
    UniformWeight,
    num_groups,
    pack_e2m1,
    row_chunks,
    unpack_e2m1,
)

QUANT_METHOD = "compressed-tensors"  # the export format's name and the config's quant_method
CT_MIN_VERSION = "0.18.0"  # the dense packing of 3/5/6/7-bit values arrived in 0.18.0
PACKED = "weight_packed"  # the tensor every quantized module has (how a loader recognises one)
PROVENANCE = {"packing": "ct-dense-v1", "compressed_tensors_min": CT_MIN_VERSION}  # what compressor.json records


@functools.cache
def require_installed_version() -> None:
    """Refuse to write with a compressed-tensors older than ``CT_MIN_VERSION``: its ``pack_to_int32``
    pads 3/5/6/7-bit rows (0.17.1: ``[256, 77]`` instead of ``[256, 72]``), which no reader loads."""
    from importlib.metadata import version

    from compressor.errors import UserError

    installed = version("compressed-tensors")
    if _release(installed) < _release(CT_MIN_VERSION):
        raise UserError(
            f"compressed-tensors {installed} is installed; exporting needs >= {CT_MIN_VERSION} (pip install "
            f"'compressed-tensors>={CT_MIN_VERSION}')"
        )


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> ct ``weight_packed``; rows pack independently, so a chunk at a time."""
    offset = 2 ** (bits - 1)
    chunks = [
        pack_to_int32((codes[rows].to(torch.int16) - offset).to(torch.int8), bits) for rows in row_chunks(*codes.shape)
    ]
    return torch.cat(chunks)


def uniform_to_ct_tensors(weight: UniformWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    require_installed_version()
    offset = 2 ** (weight.bits - 1)
    tensors = {
        "weight_packed": pack_codes(weight.codes, weight.bits),
        "weight_scale": weight.scales.to(scale_dtype),
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }
    if weight.zeros is not None:
        signed_zeros = (weight.zeros - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(signed_zeros, weight.bits, packed_dim=0)
    return tensors


def uniform_from_ct_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> UniformWeight:
    n, k = (int(v) for v in tensors["weight_shape"])
    offset = 2 ** (bits - 1)
    signed = unpack_from_int32(tensors["weight_packed"], bits, torch.Size((n, k)))
    zeros = None
    if "weight_zero_point" in tensors:
        groups = num_groups(k, group_size)
        signed_zeros = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size((n, groups)), packed_dim=0)
        zeros = signed_zeros.to(torch.int32) + offset
    codes = (signed.to(torch.int32) + offset).to(torch.uint8)
    return UniformWeight(codes=codes, scales=tensors["weight_scale"], zeros=zeros, bits=bits, group_size=group_size)


def repack_compressed_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> PackedUniform:
    """One layer's ``pack-quantized`` tensors (``weight_packed``, ``weight_scale``, ``weight_shape``,
    optional ``weight_zero_point``; names without the module prefix) -> the kernels' planes layout.
    The codes are decoded with compressed-tensors' own ``unpack_from_int32``, then re-packed."""
    return pack_uniform(uniform_from_ct_tensors(tensors, bits, group_size))


# ----------------------------------------------------------------------------------------------
# Float weights: ``float-quantized`` (FP8 E4M3 ``weight`` + ``weight_scale``), ``nvfp4-pack-quantized``
# (E2M1 pairs in ``weight_packed`` uint8 [N, K/2], low nibble first, E4M3 ``weight_scale`` [N, K/16],
# fp32 ``weight_global_scale`` [1]) and ``mxfp4-pack-quantized`` (the same packing, E8M0 ``weight_scale``).

FLOAT_FORMATS = {"fp8": "float-quantized", "fp8-block": "float-quantized"}
FLOAT_FORMATS.update(nvfp4="nvfp4-pack-quantized", mxfp4="mxfp4-pack-quantized")


def float_to_ct_tensors(weight: FloatWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if weight.bits == 8:
        return {"weight": weight.codes.view(torch.float8_e4m3fn), "weight_scale": weight.scales.to(scale_dtype)}
    tensors = {"weight_packed": pack_e2m1(weight.codes), "weight_scale": weight.scales}
    if weight.global_scale is not None:
        tensors["weight_global_scale"] = weight.global_scale.float()
    return tensors


def float_from_ct_tensors(tensors: dict[str, torch.Tensor], grid: str) -> FloatWeight:
    if "weight" in tensors:
        return FloatWeight(tensors["weight"].view(torch.uint8), tensors["weight_scale"], None, grid)
    codes = unpack_e2m1(tensors["weight_packed"])
    return FloatWeight(codes, tensors["weight_scale"], tensors.get("weight_global_scale"), grid)


def float_weights_args(grid: str) -> dict:
    args = {
        "fp8": {"group_size": None, "strategy": "channel"},
        "fp8-block": {"group_size": None, "strategy": "block", "block_structure": [128, 128]},
        "nvfp4": {"group_size": 16, "strategy": "tensor_group", "scale_dtype": "torch.float8_e4m3fn"},
        "mxfp4": {"group_size": 32, "strategy": "group", "scale_dtype": "torch.uint8"},
    }[grid]
    bits = FLOAT_GRIDS[grid].bits
    return {"num_bits": bits, "type": "float", "symmetric": True, **args, "dynamic": False, "observer": "minmax"}


def grid_of(args: dict) -> str:
    """The float grid of a config group's ``weights``."""
    grid = next((g for g in FLOAT_FORMATS if args["strategy"] == float_weights_args(g)["strategy"]), None)
    if grid is None or args["num_bits"] != FLOAT_GRIDS[grid].bits:
        raise ValueError(f"float weights {args} are none of {', '.join(FLOAT_FORMATS)}")
    return grid


# ----------------------------------------------------------------------------------------------
# An FP8 KV cache beside the weights: the config's ``kv_cache_scheme`` (llm-compressor's FP8 cache: E4M3, one
# static symmetric scale per tensor) and each attention module's ``k_scale`` / ``v_scale`` (fp32 [1], written
# by ``fp8_kv`` as buffers of ``self_attn``), the names vLLM's CompressedTensorsKVCacheMethod and transformers'
# compressed-tensors loader read. It quantizes every key and value, the prompt's included, so only our FP8
# cache with ``values`` and ``quantize_fresh`` has this form.

KV_CACHE_SCHEME = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "group_size": None,
    "strategy": "tensor",
    "block_structure": None,
    "dynamic": False,
    "actorder": None,
    "observer": "minmax",
    "observer_kwargs": {},
}
FP8_CACHE_ENTRY = {"method": "fp8", "values": True, "quantize_fresh": True}


def kv_cache_scheme(entry: dict | None) -> dict | None:
    """compressed-tensors' ``kv_cache_scheme`` of our ``kv_cache`` entry; None when it has no such form (a BFP
    cache, FP8 keys only, a prompt left exact)."""
    return dict(KV_CACHE_SCHEME) if entry == FP8_CACHE_ENTRY else None


def kv_cache_entry(quantization_config: dict) -> dict | None:
    """Our ``kv_cache`` entry of a compressed-tensors config's ``kv_cache_scheme`` (None: no quantized cache)."""
    scheme = quantization_config.get("kv_cache_scheme")
    if not scheme:
        return None
    keys = ("num_bits", "type", "symmetric", "strategy", "dynamic")
    if any(scheme.get(key) != KV_CACHE_SCHEME[key] for key in keys):
        raise ValueError(f"kv_cache_scheme {scheme} is not an FP8 per-tensor static cache (the one we run)")
    return dict(FP8_CACHE_ENTRY)


# ----------------------------------------------------------------------------------------------
# The codec (see export/codecs.py)

INPUTS = inputs.LAYOUT  # the input side it records: dynamic float activations on float weights, no channel map
RECORDED_ACTIVATIONS = ("fp8", "mxfp4")  # and nvfp4 with a calibrated static global scale (input_global_scale)


def supports(weight, quantized_inputs=None) -> bool:
    """Uniform weights of weight-only layers; float weights, also with FP8 or MXFP4 dynamic activations or NVFP4
    ones with a calibrated ``input_global_scale`` (``quantized_inputs``: the ``QuantizedLinear`` whose inputs are
    quantized)."""
    if weight.kind == "uniform":
        return not quantized_inputs
    if weight.kind != "float":
        return False
    if not quantized_inputs:
        return True
    spec = quantized_inputs.input_activations
    recorded = spec is not None and (spec.format in RECORDED_ACTIVATIONS or spec.static_global_scale)
    return quantized_inputs.channel_map is None and recorded


def module_entry(weight) -> dict:
    """The scheme of one module: modules sharing one are one config group."""
    if weight.kind == "float":
        return {"grid": weight.grid}
    return {"bits": weight.bits, "group_size": weight.group_size, "symmetric": weight.symmetric}


def to_tensors(weight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if weight.kind == "float":
        return float_to_ct_tensors(weight, scale_dtype)
    return uniform_to_ct_tensors(weight, scale_dtype)


def group_for(name: str, quantization_config: dict) -> dict:
    for group in quantization_config["config_groups"].values():
        for target in group["targets"]:
            if target == "Linear" or (target.startswith("re:") and re.match(target[3:], name)) or target == name:
                return group
    raise ValueError(f"{name}: has quantized weights but matches no config group")


def group_args_for(name: str, quantization_config: dict) -> dict:
    return group_for(name, quantization_config)["weights"]


def input_entry(quantization_config: dict, name: str) -> dict:
    """What the input side reads of module ``name``: its group's ``input_activations``."""
    return {"input_activations": group_for(name, quantization_config).get("input_activations")}


def read_module(
    tensors: dict[str, torch.Tensor], quantization_config: dict, name: str, dtype: torch.dtype
) -> UniformWeight | FloatWeight:
    """Module ``name``'s value from its checkpoint tensors; uniform weights' scales in ``dtype`` (float weights'
    E4M3/E8M0 scales as stored)."""
    args = group_args_for(name, quantization_config)
    if args.get("type") == "float":
        weight = float_from_ct_tensors(tensors, grid_of(args))
        if weight.bits == 8:
            weight.scales = weight.scales.to(dtype)
        return weight
    group_size = -1 if args["strategy"] == "channel" else args["group_size"]
    weight = uniform_from_ct_tensors(tensors, args["num_bits"], group_size)
    weight.scales = weight.scales.to(dtype)
    return weight


def weights_args(bits: int, group_size: int, symmetric: bool) -> dict:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def scheme_of(entry: dict) -> tuple[str, dict, dict | None]:
    """A module entry's (format, weights args, input activations)."""
    if "grid" in entry:
        scheme = (FLOAT_FORMATS[entry["grid"]], float_weights_args(entry["grid"]))
    else:
        scheme = ("pack-quantized", weights_args(entry["bits"], entry["group_size"], entry["symmetric"]))
    return (*scheme, entry.get("input_activations"))


# vLLM resolves a MoE layer's scheme from the names ``{experts}.0.gate_proj`` / ``.0.up_proj`` / ``.0.down_proj``
# (compressed_tensors_moe.py ``get_moe_method``) whatever the checkpoint calls them: Mixtral's w1 / w3 / w2
VLLM_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def target(name: str) -> str:
    """The config group target of module ``name``: its name, and for a Mixtral expert projection also the name vLLM
    looks its scheme up by."""
    expert = re.match(r"^(.*\.experts\.\d+)\.(w[123])$", name)
    if expert is None:
        return f"re:^{re.escape(name)}$"
    return f"re:^{re.escape(expert[1])}\\.(?:{expert[2]}|{VLLM_EXPERT_NAMES[expert[2]]})$"


def quantization_config(modules: dict[str, dict], ignore: list[str]) -> dict:
    """``modules`` maps each quantized linear's name to its ``module_entry`` (and input side); one group per
    scheme, each with its format (the config's ``format`` is theirs, or "mixed-precision")."""
    import json

    schemes: dict[str, list[str]] = {}
    for name, entry in modules.items():
        schemes.setdefault(json.dumps(scheme_of(entry), sort_keys=True), []).append(name)
    single = len(schemes) == 1
    groups, formats = {}, set()
    for number, (key, names) in enumerate(sorted(schemes.items())):
        format, weights, input_activations = json.loads(key)
        formats.add(format)
        groups[f"group_{number}"] = {
            "targets": ["Linear"] if single else [target(name) for name in sorted(names)],
            "weights": weights,
            "input_activations": input_activations,
            "output_activations": None,
            "format": format,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": sorted(ignore),
        "config_groups": groups,
    }
