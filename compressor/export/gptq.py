"""The export codec of uniform integer weights in the GPTQ checkpoint layout (``quant_method: "gptq"``).

The layout vLLM's GPTQ kernels and transformers' GPTQ integration (optimum + gptqmodel) read; it
carries what compressed-tensors cannot carry to an engine: asymmetric and 2/3-bit weights (vLLM's
``gptq.py`` serves 2/3/4/8 bits with zero points; its compressed-tensors path refuses zero points
below 4 bits, and transformers' compressed-tensors loader cannot read packed zero points).

Per quantized linear (N outputs, K inputs, b bits, G groups), sources: ModelCloud/GPTQModel
``gptqmodel/nn_modules/qlinear/__init__.py`` (``BaseQuantLinear.__init__`` buffers, ``pack_original``,
``PackableQuantLinear.dequantize_weight``), vllm-project/vllm
``vllm/model_executor/layers/quantization/gptq.py`` (``GPTQLinearMethod.create_weights``):

* ``qweight`` int32 [K*b/32, N]: the codes of each column packed along K, a little-endian bit
  stream: value i of a run of 32 occupies bits [i*b, i*b+b) of that run's b words (for 2/4/8 bits
  that is 32/b values a word, value j at bits [j*b, j*b+b); at 3 bits values straddle words, as in
  ``pack_original``'s 3-bit branch);
* ``qzeros``  int32 [G, N*b/32]: the zero points of each group packed along N the same way;
* ``scales``  [G, N] in the export dtype (GPTQ tools write float16; the readers cast to their own);
* ``g_idx``   int32 [K]: the group of each input column (``k // group_size``; no act-order);
* ``bias`` unchanged.

Dequantization ``w[n, k] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``. Zero points:
``checkpoint_format: "gptq"`` (v1, what most readers assume) stores ``z - 1`` (AutoGPTQ's historical
off-by-one; readers add 1 back: vLLM's ``gptq_gemm`` unless ``use_v2_format``, gptqmodel's
``convert_gptq_v1_to_v2_format``); ``"gptq_v2"`` stores ``z``. A zero point of 0 has no v1 code
(``-1`` wraps to ``2**b - 1`` and a reader decodes ``2**b``), and asymmetric quantizers do produce
it, so asymmetric weights are written as v2 and symmetric ones (zero ``2**(b-1)``) as v1, which every
reader takes. gptqmodel reads both; vLLM reads v2 from vllm-project/vllm#26092 (October 2025) on.

Which vLLM serves what (see ``compressor/serving.py``): vLLM's GPTQ went to Marlin kernels only in
vllm-project/vllm#38288 (2026), which take 4- and 8-bit symmetric weights; 2/3-bit and asymmetric
GPTQ checkpoints load in the releases before it (``gptq.py``'s ``gptq_gemm``) and in transformers.

Mixed precision (per-module bits and group sizes, one symmetry) is written the way vLLM and GPTQModel
read it: the config's ``bits``/``group_size`` are the scheme covering the most weights, and every other
module gets a positive ``dynamic`` rule ``"+:REGEX": {"bits": b, "group_size": g}``; a dense linear inside
the blocks gets a negative one ``"-:REGEX": {}``. Both readers take the first rule whose regex
``re.match``es the layer's name (vllm ``quantization/utils/gptq_utils.py`` ``get_dynamic_override``,
GPTQModel ``quantization/config.py`` ``dynamic_get``), but vLLM names its fused layers (``qkv_proj``,
``gate_up_proj``, a MoE layer's ``experts``) while GPTQModel names the checkpoint's modules: each rule
matches both (``vllm_layer``), so the members of a fused layer must share one scheme (else the export is
refused). transformers' ``GPTQConfig`` drops ``dynamic`` (5.25), so it loads single-scheme checkpoints only.
The config has one ``sym``: mixed symmetry is refused. Shapes must pack whole words: K and N multiples of
32 (of 32/b is enough at 2/4/8 bits) and K a multiple of the group size; weights that do not fit are
refused before anything is written (``supports``).
"""

from __future__ import annotations

import re

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compressor.export.vllm_layers import EXPERT, vllm_layer
from compressor.weights.values import UniformWeight, row_chunks

QUANT_METHOD = "gptq"  # the export format's name and the config's quant_method
BITS = (2, 3, 4, 8)
PACKED = "qweight"  # the tensor every quantized module has (how a loader recognises one)
PROVENANCE = {"packing": "gptq", "compressed_tensors_min": None}  # what compressor.json records


def words_multiple(bits: int) -> int:
    """The values one packed run holds: K and N must be multiples of it."""
    return 32 if bits == 3 else 32 // bits


def shape_problem(weight) -> str | None:
    """Why ``weight`` has no GPTQ layout, or None."""
    if weight.kind != "uniform":
        return f"'{weight.kind}' weights are not uniform integers"
    if weight.bits not in BITS:
        return f"{weight.bits}-bit weights (GPTQ stores {', '.join(map(str, BITS))} bits)"
    n, k = weight.shape
    step = words_multiple(weight.bits)
    if k % step or n % step:
        return f"shape {n}x{k}: GPTQ packs {step} values at a time along both dimensions"
    if weight.group_size != -1 and k % weight.group_size:
        return f"group size {weight.group_size} does not divide the {k} inputs"
    return None


def step_schemes(step, in_features: int) -> list[tuple[int, int]]:
    """The (bits, group size) schemes a uniform quantizer step may give a linear of this input width: its own, or
    with a bit allocation (``allocates``) every candidate it chooses from (``candidate_schemes``)."""
    if getattr(step, "allocates", False):
        return list(step.candidate_schemes(in_features))
    return [(step.bits, step.group_size)]


def step_problem(step, linears: dict) -> str | None:
    """Why the weights a recipe step makes cannot be written as GPTQ, from its settings and the
    linears it will see (weights on meta), before any work; None when they can (or it makes none)."""
    if getattr(step, "bits", None) is None:
        return None
    if not hasattr(step, "symmetric"):
        return f"{step.name} makes non-uniform weights, which GPTQ cannot hold"
    if getattr(step, "float_grid", None) is not None:
        return f"grid: {step.grid} weights are floats, which GPTQ cannot hold"
    widths = ", ".join(map(str, BITS))
    if step.bits not in BITS:
        return f"bits: {step.bits}-bit weights have no GPTQ layout ({widths} bits)"
    for name, module in linears.items():
        for bits, _ in step_schemes(step, module.in_features):
            if bits not in BITS:
                return f"schemes: {bits}-bit weights have no GPTQ layout ({widths} bits)"
            unit = words_multiple(bits)
            if module.in_features % unit or module.out_features % unit:
                size = f"{module.out_features}x{module.in_features}"
                return f"{name} is {size}: GPTQ packs {unit} values at a time along both dimensions ({bits} bits)"
    return None


def symmetry_differs(step, other) -> bool:
    """Whether two uniform quantizer steps make weights of different symmetry (one GPTQ config has one ``sym``)."""
    uniform = [getattr(s, "bits", None) is not None and hasattr(s, "symmetric") for s in (step, other)]
    return all(uniform) and step.symmetric != other.symmetric


def writes_low_asymmetric(step, linears: dict) -> bool:
    """Whether a step may make asymmetric weights below 4 bits, which export ``auto`` writes as GPTQ (and with
    them every other asymmetric uniform weight of the checkpoint, which has one format)."""
    if getattr(step, "bits", None) is None or getattr(step, "symmetric", True):
        return False
    return any(bits < 4 for module in linears.values() for bits, _ in step_schemes(step, module.in_features))


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] -> int32 [R, C*b/32], each row a little-endian bit stream. This is
    compressed-tensors' dense packing (``pack_to_int32`` of ``u - 2**(b-1)``), bit for bit the
    GPTQ word layout when C is a multiple of 32/b (of 32 at 3 bits)."""
    offset = 2 ** (bits - 1)
    chunks = [
        pack_to_int32((values[rows].to(torch.int16) - offset).to(torch.int8), bits)
        for rows in row_chunks(*values.shape)
    ]
    return torch.cat(chunks)


def unpack_columns(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of ``pack_columns``: int32 [R, C*b/32] -> unsigned int32 values [R, C]."""
    signed = unpack_from_int32(packed, bits, torch.Size((packed.shape[0], columns)))
    return signed.to(torch.int32) + 2 ** (bits - 1)


def zero_offset(checkpoint_format: str) -> int:
    """What is subtracted from a zero point before it is stored."""
    return 1 if checkpoint_format == "gptq" else 0


def checkpoint_format_for(weight: UniformWeight) -> str:
    return "gptq" if weight.symmetric else "gptq_v2"


def to_gptq_tensors(
    weight: UniformWeight, checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    problem = shape_problem(weight)
    if problem is not None:
        raise ValueError(f"no GPTQ layout for {problem}")
    n, k = weight.shape
    group_size = k if weight.group_size == -1 else weight.group_size
    zeros = weight.zero_points().t().to(torch.int32) - zero_offset(checkpoint_format)  # [G, N]
    if int(zeros.min()) < 0:
        raise ValueError("a zero point of 0 has no code in checkpoint_format 'gptq' (v1); write 'gptq_v2'")
    return {
        "qweight": pack_columns(weight.codes.to(torch.int32), weight.bits).t().contiguous(),
        "qzeros": pack_columns(zeros, weight.bits),
        "scales": weight.scales.t().to(scale_dtype).contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // group_size).to(torch.int32),
    }


def from_gptq_tensors(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, checkpoint_format: str = "gptq"
) -> UniformWeight:
    packed_k, n = tensors["qweight"].shape
    k = packed_k * 32 // bits
    if "g_idx" in tensors:
        expected = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
        if not torch.equal(tensors["g_idx"].to(torch.int32), expected):
            raise ValueError("g_idx is not k // group_size (act-order checkpoints are not read)")
    codes = unpack_columns(tensors["qweight"].t().contiguous(), bits, k).to(torch.uint8)  # [N, K]
    scales = tensors["scales"].t().contiguous()  # [N, G]
    zeros = None
    if not symmetric:
        stored = unpack_columns(tensors["qzeros"], bits, n)  # [G, N]
        zeros = (stored + zero_offset(checkpoint_format)).t().contiguous()
    return UniformWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size)


# ----------------------------------------------------------------------------------------------
# The codec (see export/codecs.py)


INPUTS = None  # no input side: W+A layers go to the native format


def supports(weight, quantized_inputs: bool = False) -> bool:
    return not quantized_inputs and shape_problem(weight) is None


def module_entry(weight: UniformWeight) -> dict:
    n, k = weight.shape
    return {
        "bits": weight.bits,
        "group_size": weight.group_size,
        "symmetric": weight.symmetric,
        "checkpoint_format": checkpoint_format_for(weight),
        "weights": n * k,  # (which scheme covers the most weights becomes the config's own)
    }


def to_tensors(weight: UniformWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return to_gptq_tensors(weight, checkpoint_format_for(weight), scale_dtype)


def module_scheme(quantization_config: dict, name: str) -> tuple[int, int, bool] | None:
    """(bits, group size, symmetric) of the checkpoint's module ``name``: the config's, overridden by the first
    ``dynamic`` rule whose regex ``re.match``es the name, as vLLM and GPTQModel read it; None when that rule is
    negative (the module is dense)."""
    scheme = {"bits": quantization_config["bits"], "group_size": quantization_config["group_size"]}
    scheme["sym"] = quantization_config.get("sym", True)
    for pattern, overrides in (quantization_config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            scheme.update({key: value for key, value in overrides.items() if key in scheme})
            break
    return scheme["bits"], scheme["group_size"], scheme["sym"]


def read_module(
    tensors: dict[str, torch.Tensor], quantization_config: dict, name: str, dtype: torch.dtype
) -> UniformWeight:
    scheme = module_scheme(quantization_config, name)
    if scheme is None:
        raise ValueError(f"{name}: has packed GPTQ tensors, but a negative dynamic rule says it is dense")
    bits, group_size, symmetric = scheme
    weight = from_gptq_tensors(
        tensors, bits, group_size, symmetric, quantization_config.get("checkpoint_format", "gptq")
    )
    weight.scales = weight.scales.to(dtype)
    return weight


# ----------------------------------------------------------------------------------------------
# The config: one scheme, per-module overrides in ``dynamic``


def layer_pattern(layer: str, members: list[str]) -> str:
    """The regex of a ``dynamic`` rule for vLLM layer ``layer`` and its checkpoint linears ``members``: it
    ``re.match``es the layer's name and each member's, and nothing else of the model."""
    if EXPERT.match(members[0]):
        projections = "|".join(sorted({re.escape(m.rpartition(".")[2]) for m in members}))
        return rf"^{re.escape(layer)}(?:\.\d+\.(?:{projections}))?$"
    if members == [layer]:
        return rf"^{re.escape(layer)}$"
    leaves = "|".join(sorted({re.escape(name.rpartition(".")[2]) for name in [layer, *members]}))
    return rf"^{re.escape(layer.rpartition('.')[0])}\.(?:{leaves})$"


def scheme_words(bits: int, group_size: int) -> str:
    return f"{bits}-bit group {group_size}"


def scheme_problem(modules: dict[str, dict], dense: list[str] = ()) -> str | None:
    """Why these module entries (and the dense linears ``dense`` inside the blocks) cannot share one GPTQ
    config, or None: the config has one ``sym``, and every vLLM layer takes one scheme (or stays dense)."""
    symmetry = {name: e["symmetric"] for name, e in modules.items()}
    if len(set(symmetry.values())) > 1:
        sym = next(n for n, s in symmetry.items() if s)
        asym = next(n for n, s in symmetry.items() if not s)
        return f"a GPTQ config has one `sym`, and {sym} is symmetric while {asym} is asymmetric"
    for layer, members in layers_of([*modules, *dense]).items():
        schemes: dict[str, list[str]] = {}
        for name in members:
            entry = modules.get(name)
            words = "dense" if entry is None else scheme_words(entry["bits"], entry["group_size"])
            schemes.setdefault(words, []).append(name.rpartition(".")[2])
        if len(schemes) > 1:
            listed = "; ".join(f"{words}: {', '.join(names)}" for words, names in sorted(schemes.items()))
            return f"{layer}: vLLM serves {', '.join(members)} as one layer, which takes one scheme ({listed})"
    return None


def layers_of(names) -> dict[str, list[str]]:
    """vLLM layer -> the checkpoint linears it serves (``vllm_layer``), sorted."""
    layers: dict[str, list[str]] = {}
    for name in sorted(names):
        layers.setdefault(vllm_layer(name), []).append(name)
    return layers


def quantization_config(modules: dict[str, dict], ignore: list[str]) -> dict:
    """The config of a GPTQ checkpoint. Its ``bits`` and ``group_size`` are the scheme covering the most weights;
    every vLLM layer of another scheme gets a positive ``dynamic`` rule with its own. ``ignore`` lists the dense
    linears; those inside the blocks are left out of ``modules_in_block_to_quantize`` (optimum, transformers)
    and named by negative ``dynamic`` rules (vLLM's and gptqmodel's per-module overrides)."""
    dense_in_blocks = sorted(name for name in ignore if block_suffix(name) != name)
    problem = scheme_problem(modules, dense_in_blocks)
    if problem is not None:
        raise ValueError(problem)
    weights: dict[tuple[int, int], int] = {}
    for entry in modules.values():
        scheme = (entry["bits"], entry["group_size"])
        weights[scheme] = weights.get(scheme, 0) + entry.get("weights", 1)
    bits, group_size = max(sorted(weights), key=lambda scheme: weights[scheme])
    symmetric = next(iter(modules.values()))["symmetric"]
    checkpoint_format = "gptq" if all(e["checkpoint_format"] == "gptq" for e in modules.values()) else "gptq_v2"
    config = {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": symmetric,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,  # optimum's and gptqmodel's name for checkpoint_format
        "pack_dtype": "int32",
        "lm_head": False,
    }
    dynamic = {}
    if dense_in_blocks:
        suffixes = sorted({block_suffix(name) for name in modules})
        mixed = sorted({block_suffix(name) for name in dense_in_blocks} & set(suffixes))
        if mixed:
            raise ValueError(
                f"{', '.join(mixed)} is quantized in some blocks and dense in others, which optimum's "
                "modules_in_block_to_quantize cannot say"
            )
        config["modules_in_block_to_quantize"] = [suffixes]
        dynamic.update({f"-:{layer_pattern(layer, names)}": {} for layer, names in layers_of(dense_in_blocks).items()})
    for layer, names in layers_of(modules).items():
        entry = modules[names[0]]
        if (entry["bits"], entry["group_size"]) != (bits, group_size):
            dynamic[f"+:{layer_pattern(layer, names)}"] = {"bits": entry["bits"], "group_size": entry["group_size"]}
    if dynamic:
        config["dynamic"] = dynamic
    return config


def block_suffix(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj`` (a name outside the blocks is returned as is)."""
    match = re.match(r"^.*?\.\d+\.(.+)$", name)
    return match.group(1) if match else name
