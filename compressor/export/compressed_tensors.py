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

from compressor.kernels.packing import PackedUniform, pack_uniform
from compressor.weights.values import UniformWeight, num_groups, row_chunks

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
# The codec of uniform weights (see export/codecs.py)


INPUTS = None  # no input side: W+A layers go to the native format


def supports(weight, quantized_inputs: bool = False) -> bool:
    return not quantized_inputs and weight.kind == "uniform"


def module_entry(weight: UniformWeight) -> dict:
    """The scheme of one module: modules sharing one are one config group."""
    return {"bits": weight.bits, "group_size": weight.group_size, "symmetric": weight.symmetric}


def to_tensors(weight: UniformWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return uniform_to_ct_tensors(weight, scale_dtype)


def group_args_for(name: str, quantization_config: dict) -> dict:
    for group in quantization_config["config_groups"].values():
        for target in group["targets"]:
            if target == "Linear" or (target.startswith("re:") and re.match(target[3:], name)) or target == name:
                return group["weights"]
    raise ValueError(f"{name}: has packed weights but matches no config group")


def read_module(
    tensors: dict[str, torch.Tensor], quantization_config: dict, name: str, dtype: torch.dtype
) -> UniformWeight:
    """Module ``name``'s value from its checkpoint tensors; scales in ``dtype``."""
    args = group_args_for(name, quantization_config)
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


def quantization_config(modules: dict[str, dict], ignore: list[str]) -> dict:
    """``modules`` maps each quantized linear's name to its ``module_entry``; one group per scheme."""
    schemes: dict[tuple, list[str]] = {}
    for name, entry in modules.items():
        schemes.setdefault((entry["bits"], entry["group_size"], entry["symmetric"]), []).append(name)
    single = len(schemes) == 1
    groups = {}
    for number, ((bits, group_size, symmetric), names) in enumerate(sorted(schemes.items())):
        groups[f"group_{number}"] = {
            "targets": ["Linear"] if single else [f"re:^{re.escape(name)}$" for name in sorted(names)],
            "weights": weights_args(bits, group_size, symmetric),
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": sorted(ignore),
        "config_groups": groups,
    }
