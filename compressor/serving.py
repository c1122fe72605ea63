"""Which serving engine loads a checkpoint, and through which path: ``compressor check``.

Reads only ``config.json`` (no weights, no torch); for GPTQ in transformers it also looks whether optimum and
gptqmodel are installed, which that loader needs. A checkpoint is described as parts: each compressed-tensors config
group (integer, FP8, NVFP4 or MXFP4 weights), a GPTQ checkpoint, our native lookup-table format (and a rotated
model's online Hadamard), a DeepSeek-V3 MLA attention, a SwiftKV model, an architecture whose modeling code ships
with the checkpoint, or the plain architecture. For every (engine, part kind) one ``Route`` in ``ROUTES`` says how
the engine serves it and what it requires; the verdict is the path when every requirement holds, or the first
requirement that fails, in words. Each requirement and caveat names its source, so a rule can be re-read when an
engine changes: the engines' code moves, and these rules describe their releases as read from their source in
November 2026 (vLLM main, transformers 5.24).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("vllm", "transformers")


@dataclass(frozen=True)
class Rule:
    says: str  # the rule in words: what must hold (a requirement) or what to know (a caveat)
    holds: Callable[[dict], bool]
    source: str


@dataclass(frozen=True)
class Route:
    engine: str
    kind: str
    path: str  # how the engine serves the part when every requirement holds
    requirements: tuple[Rule, ...] = ()
    caveats: tuple[Rule, ...] = ()  # shown when ``holds`` is False; they do not refuse


@dataclass
class Verdict:
    engine: str
    part: str
    loads: bool
    how: str  # the path, or why not
    source: str = ""
    caveats: list[str] = field(default_factory=list)

    def line(self) -> str:
        state = "yes" if self.loads else "NO"
        text = f"{self.engine}: {self.part}: {state}, {self.how}"
        text += "".join(f"; note: {c}" for c in self.caveats)
        return text + (f" [{self.source}]" if self.source else "")


VLLM_WNA16 = "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py"
VLLM_MARLIN = "vllm/model_executor/layers/quantization/utils/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)"
VLLM_MLA = (
    "vllm/v1/attention/backends/mla/*.py get_supported_head_sizes (576 for FlashMLA, FlashInfer MLA, Triton MLA, CPU "
    "MLA)"
)
HF_CT = "transformers/quantizers/quantizer_compressed_tensors.py"
VLLM_GPTQ = (
    "vllm/model_executor/layers/quantization/auto_gptq.py (Marlin only since vllm-project/vllm#38288; 2/3-bit "
    "requested back in vllm-project/vllm#45051)"
)
HF_GPTQ = (
    "transformers/quantizers/quantizer_gptq.py (imports optimum.gptq; validate_environment needs gptqmodel on a CPU)"
)
VLLM_MOE = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe.py (get_moe_method)"
VLLM_MOE_MARLIN = "vllm/model_executor/layers/quantization/utils/marlin_utils.py (check_moe_marlin_supports_layer)"
HF_CT_MOE = "transformers/integrations/compressed_tensors.py (CompressedTensorsDequantize, experts)"
VLLM_CT = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py (_get_scheme_from_parts)"
VLLM_FP8 = "vllm/.../compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py (get_min_capability 89)"
VLLM_MXFP4 = (
    "vllm/.../compressed_tensors/compressed_tensors.py (_is_mxfp4 -> CompressedTensorsW4A16Mxfp4, whatever "
    "input_activations; schemes/compressed_tensors_w4a4_mxfp4.py arrived later, min capability 75)"
)
VLLM_NVFP4 = (
    "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py "
    "(process_weights_after_loading, select_nvfp4_linear_backend)"
)
VLLM_KV = (
    "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_kv.py "
    "(CompressedTensorsKVCacheMethod.validate_kv_cache_scheme)"
)
CT_KV_HOOK = (
    "compressed_tensors/quantization/lifecycle/initialize.py (is_cached_attention_module looks for a "
    "past_key_values argument; transformers 5.25's attention forward takes `cache`)"
)
CT_FP4_BF16 = (
    "compressed_tensors/compressors/nvfp4/helpers.py (unpack_fp4_from_uint8 returns bf16); tests/test_floats.py"
)
ARCTIC_SWIFTKV = "arctic_inference/vllm/swiftkv/llama_swiftkv.py, arctic_inference/common/swiftkv/configs.py"

ROUTES: tuple[Route, ...] = (
    Route(
        "vllm",
        "compressed-tensors",
        "CompressedTensorsWNA16 (Marlin or its fallbacks)",
        requirements=(
            Rule(
                "integer weights with 16-bit activations",
                lambda p: p["type"] == "int" and not p["activations"],
                VLLM_WNA16,
            ),
            Rule(
                "asymmetric (zero-point) weights only at 4 or 8 bits (WNA16_ZP_SUPPORTED_TYPES_MAP)",
                lambda p: p["symmetric"] or p["bits"] in (4, 8),
                VLLM_WNA16,
            ),
            Rule(
                "symmetric weights at 2..8 bits (WNA16_SUPPORTED_TYPES_MAP)", lambda p: 2 <= p["bits"] <= 8, VLLM_WNA16
            ),
        ),
        caveats=(
            Rule(
                "2, 3, 5, 6 and 7 bits are in vLLM's newest releases only (uint2b2 .. uint7b64 kernels)",
                lambda p: p["bits"] in (4, 8),
                VLLM_WNA16,
            ),
            Rule(
                "Marlin's fast path takes group sizes -1, 32, 64, 128; others run on slower kernels where one exists",
                lambda p: p["group_size"] in (-1, 32, 64, 128),
                VLLM_MARLIN,
            ),
        ),
    ),
    Route(
        "vllm",
        "compressor",
        "none",
        requirements=(
            Rule(
                "a loader for quant_method 'compressor' (our vLLM plugin is not built yet)",
                lambda p: False,
                "vllm/model_executor/layers/quantization/__init__.py (QUANTIZATION_METHODS)",
            ),
        ),
    ),
    Route(
        "vllm",
        "online-hadamard",
        "none",
        requirements=(
            Rule(
                "a Hadamard transform of down_proj's input inside the Llama-family MLP (rotate's online_hadamard); "
                "vLLM's LlamaMLP runs gate/up, the activation and down_proj only",
                lambda p: False,
                "vllm/model_executor/models/llama.py (LlamaMLP.forward)",
            ),
        ),
    ),
    Route(
        "vllm",
        "deepseek-mla",
        "DeepseekV2/V3 model with MLA attention",
        requirements=(
            Rule(
                "kv_lora_rank + qk_rope_head_dim of 576 or 320 (the head sizes its MLA backends accept; TransMLA's "
                "`serving: vllm` picks them)",
                lambda p: p["kv_lora_rank"] + p["qk_rope_head_dim"] in (576, 320),
                VLLM_MLA,
            ),
            Rule(
                "plain rotary frequencies: its DeepSeek attention turns any rope scaling into deepseek_yarn, so "
                "TransMLA's `exact: true` export (longrope frequencies) runs in transformers only",
                lambda p: p["rope_type"] in ("default", None),
                "vllm/model_executor/models/deepseek_v2.py (DeepseekV2Attention: rope_scaling['rope_type'] = "
                "'deepseek_yarn')",
            ),
        ),
    ),
    Route(
        "vllm",
        "gptq",
        "its GPTQ loader on Marlin kernels",
        requirements=(
            Rule(
                "4- or 8-bit symmetric weights (uint4b8, uint8b128: Marlin's only GPTQ types); 2/3-bit and asymmetric "
                "GPTQ load only in vLLM releases before #38288, through gptq.py's gptq_gemm (checkpoint_format "
                "gptq_v2 from #26092 on)",
                lambda p: p["symmetric"] and p["bits"] in (4, 8),
                VLLM_GPTQ,
            ),
        ),
        caveats=(
            Rule(
                "Marlin's group sizes are -1, 32, 64, 128", lambda p: p["group_size"] in (-1, 32, 64, 128), VLLM_MARLIN
            ),
        ),
    ),
    Route(
        "vllm",
        "shipped-code",
        "none",
        requirements=(
            Rule(
                "a vLLM model class for the architecture (the checkpoint ships transformers modeling code, which vLLM "
                "does not run; MoDeGPT's `export: masked` keeps stock shapes for vLLM)",
                lambda p: False,
                "vllm/model_executor/models/registry.py (_VLLM_MODELS)",
            ),
        ),
    ),
    Route(
        "vllm",
        "swiftkv",
        "arctic-inference's LlamaSwiftKVForCausalLM (pip install arctic-inference; ARCTIC_INFERENCE_ENABLED=1)",
        requirements=(
            Rule(
                "a Llama base (the plugin has no Qwen2 SwiftKV model)",
                lambda p: p["model_type"] == "llama_swiftkv",
                ARCTIC_SWIFTKV,
            ),
            Rule(
                "key_value_group_size 1: the plugin ignores AcrossKV (its config lacks the key, or marks it "
                "deprecated) and expects k/v_proj_swiftkv in every upper layer",
                lambda p: p["group_size"] == 1,
                ARCTIC_SWIFTKV,
            ),
        ),
    ),
    Route(
        "vllm",
        "moe-experts",
        "FusedMoE's CompressedTensorsWNA16MarlinMoEMethod (or its Triton CompressedTensorsWNA16MoEMethod fallback)",
        requirements=(
            Rule(
                "one scheme for every expert projection of a layer (FusedMoE stacks them; 'All MoE projections need to "
                "have same quantization scheme')",
                lambda p: p["schemes"] == 1,
                VLLM_MOE,
            ),
            Rule(
                "integer experts with 16-bit activations",
                lambda p: p["type"] == "int" and not p["activations"],
                VLLM_MOE,
            ),
            Rule("4- or 8-bit experts (WNA16_SUPPORTED_BITS)", lambda p: p["bits"] in (4, 8), VLLM_MOE),
        ),
        caveats=(
            Rule(
                "Marlin MoE needs hidden_size % 128 == 0, the expert width a multiple of max(64, group size) and a "
                "group size among -1, 32, 64, 128; otherwise the slower Triton kernel runs",
                lambda p: (
                    p["hidden_size"] % 128 == 0
                    and p["intermediate_size"] % max(64, p["group_size"]) == 0
                    and p["group_size"] in (-1, 32, 64, 128)
                ),
                VLLM_MOE_MARLIN,
            ),
        ),
    ),
    Route(
        "vllm",
        "ct-fp8",
        "CompressedTensorsW8A8Fp8 (FP8 GEMMs, dynamic per-token FP8 activations) on compute capability >= 8.9 (Ada, "
        "Hopper, Blackwell); below it CompressedTensorsW8A16Fp8 (FP8 Marlin) serves the weights and leaves the "
        "activations 16-bit",
        requirements=(
            Rule(
                "symmetric static FP8 weights per tensor, channel or block, activations absent or FP8 (_is_fp8_w8a8, "
                "_is_fp8_w8a16)",
                lambda p: p["activations"] is None or p["activations"].get("type") == "float",
                VLLM_CT,
            ),
        ),
        caveats=(
            Rule(
                "weight-only FP8 runs as W8A16 (FP8 Marlin) on every GPU: the FP8 GEMMs need input_activations",
                lambda p: p["activations"] is not None,
                VLLM_FP8,
            ),
        ),
    ),
    Route(
        "vllm",
        "ct-nvfp4",
        "CompressedTensorsW4A16Fp4 (FP4 Marlin on Ampere to Hopper, FlashInfer FP4 on Blackwell) for weight-only "
        "NVFP4; with input_activations CompressedTensorsW4A4Fp4 (FP4 GEMMs on Blackwell, compute capability 10.x; "
        "below it an emulation that dequantizes, from compute capability 7.5)",
        requirements=(
            Rule(
                "weight-only NVFP4, or NVFP4 activations with a calibrated static input_global_scale per layer "
                '(dynamic: "local", activation_global_scale: calibrated; our per-token global scale has no '
                "compressed-tensors form and exports in our native format)",
                lambda p: p["activations"] is None or p["activations"].get("dynamic") == "local",
                VLLM_CT,
            ),
        ),
        caveats=(
            Rule(
                "fused shards (q/k/v, gate/up) are served with one weight and one input global scale, the largest of "
                "theirs: ours share them (uniform.shared_global_scales), a checkpoint from elsewhere may not",
                lambda p: False,
                VLLM_NVFP4,
            ),
        ),
    ),
    Route(
        "vllm",
        "ct-mxfp4",
        "CompressedTensorsW4A16Mxfp4 (MXFP4 weights, 16-bit activations)",
        caveats=(
            Rule(
                "vLLM releases that route every MXFP4 group to CompressedTensorsW4A16Mxfp4 do not apply its MXFP4 "
                "input_activations, so they serve this checkpoint as weight-only (outputs differ from ours)",
                lambda p: p["activations"] is None,
                VLLM_MXFP4,
            ),
        ),
    ),
    Route(
        "vllm",
        "ct-kv-cache",
        "CompressedTensorsKVCacheMethod: an FP8 E4M3 KV cache with the checkpoint's per-layer k_scale / v_scale (set "
        "kv_cache_dtype='fp8', or 'auto' reads it from the config)",
        requirements=(
            Rule(
                "an 8-bit float, per-tensor, symmetric kv_cache_scheme",
                lambda p: (p["num_bits"], p["type"], p["strategy"], p["symmetric"]) == (8, "float", "tensor", True),
                VLLM_KV,
            ),
        ),
    ),
    Route(
        "vllm",
        "ct-fused",
        "one scheme for each layer it fuses",
        requirements=(
            Rule(
                "every layer it fuses (qkv_proj, gate_up_proj) in one config group, none of its members ignored "
                "('Detected some but not all shards ... are quantized', 'All shards of fused layers to have the same "
                "precision')",
                lambda p: p["split"] is None,
                "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py "
                "(find_matched_target, _match_fused_layer), quantization/utils/quant_utils.py (is_layer_skipped)",
            ),
        ),
    ),
    Route("vllm", "dense", "the model's own architecture, unquantized"),
    Route(
        "transformers",
        "compressed-tensors",
        "compressed-tensors' quantizer: the weights stay packed (weight_packed, weight_scale) and are unpacked in "
        "each forward",
        requirements=(
            Rule(
                "integer weights with 16-bit activations", lambda p: p["type"] == "int" and not p["activations"], HF_CT
            ),
            Rule(
                "symmetric weights (transformers 5.x expects unpacked zero points of shape [N, groups] and fails on "
                "packed ones; vllm-project/llm-compressor#1618)",
                lambda p: p["symmetric"],
                "tests/test_export.py (asymmetric exports load only through ours)",
            ),
        ),
        caveats=(
            Rule(
                "3, 5, 6 and 7 bits need compressed-tensors >= 0.18 (dense packing)",
                lambda p: p["bits"] in (2, 4, 8),
                "compressed_tensors/compressors/pack_quantized (pack_to_int32)",
            ),
        ),
    ),
    Route(
        "transformers",
        "ct-fp8",
        "compressed-tensors' quantizer: FP8 weights decompressed at load, FP8 activations quantized per token in each "
        "forward (the logits of our model: tests/test_floats.py)",
    ),
    *(
        Route(
            "transformers",
            kind,
            "compressed-tensors' quantizer: E2M1 weights decompressed at load (activations, where the config has them, "
            "quantized in each forward)",
            caveats=(
                Rule(
                    "load it with dtype=torch.bfloat16 (fp32 models fail in the matmul)", lambda p: False, CT_FP4_BF16
                ),
            ),
        )
        for kind in ("ct-nvfp4", "ct-mxfp4")
    ),
    Route(
        "transformers",
        "gptq",
        "its GPTQ quantizer with optimum and gptqmodel (gptqmodel's torch kernels on a CPU)",
        requirements=(
            Rule(
                "one scheme for every module: transformers' GPTQConfig drops the config's `dynamic` per-module "
                "overrides, so optimum would build every layer at the config's own bits and group size",
                lambda p: not p["override"],
                "transformers/utils/quantization_config.py (GPTQConfig has no `dynamic`; checked in 5.25)",
            ),
            Rule(
                "the optimum and gptqmodel packages, which are not installed here (pip install optimum gptqmodel; "
                "checked on the CPU with optimum 2.2.0 and gptqmodel 5.8.0: optimum 2.3 wants gptqmodel >= 7, which "
                "wants torch >= 2.14)",
                lambda p: p["gptq_stack"],
                HF_GPTQ,
            ),
        ),
    ),
    Route(
        "transformers",
        "compressor",
        "our registered quantizer and classes, after `import compressor` or with `trust_remote_code=True` "
        "(lookup-table, BFP and sparse kernels; the BFP KV cache where the config declares one); plain loads refuse it",
    ),
    Route(
        "transformers",
        "online-hadamard",
        "our quantizer makes each MLP it names an OnlineHadamardMLP after `import compressor` (our loader too)",
    ),
    Route("transformers", "deepseek-mla", "DeepseekV3ForCausalLM"),
    Route(
        "transformers",
        "ct-kv-cache",
        "the weights load; the FP8 KV cache does not run (k_scale / v_scale are reported as unexpected keys and the "
        "cache stays 16-bit); our loader (compressor.export.load_quantized_model) runs it",
        caveats=(Rule("outputs differ from the model with its FP8 cache", lambda p: False, CT_KV_HOOK),),
    ),
    Route(
        "transformers",
        "moe-experts",
        "its compressed-tensors loader: the per-expert tensors are dequantized into the fused 3-D expert weights while "
        "loading",
        requirements=(
            Rule(
                "integer experts with 16-bit activations",
                lambda p: p["type"] == "int" and not p["activations"],
                HF_CT_MOE,
            ),
            Rule("symmetric experts (no packed zero points)", lambda p: p["symmetric"], HF_CT_MOE),
        ),
        caveats=(
            Rule(
                "the experts take their dense size in memory (only the dense layers stay packed)",
                lambda p: False,
                HF_CT_MOE,
            ),
        ),
    ),
    Route(
        "transformers",
        "shipped-code",
        "the modeling code shipped with the checkpoint (`trust_remote_code=True`), or our loaders without remote code",
    ),
    Route(
        "transformers",
        "swiftkv",
        "the modeling code shipped with the checkpoint (trust_remote_code=True), or without it after `import "
        "compressor`",
    ),
    Route("transformers", "ct-fused", "each linear by its own config group (transformers fuses none of them)"),
    Route("transformers", "dense", "the model's own architecture, unquantized"),
)


def scheme_words(facts: dict) -> str:
    """ "4-bit symmetric, group 128" for a part's report line."""
    symmetry = "symmetric" if facts["symmetric"] else "asymmetric"
    return f"{facts['bits']}-bit {symmetry}, group {facts['group_size']}"


def checkpoint_parts(config: dict) -> list[tuple[str, str, dict]]:
    """(description, kind, facts) for each part of a checkpoint's config that an engine must serve."""
    parts = []
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method")
        if method == "compressed-tensors":
            for name, group in quantization.get("config_groups", {}).items():
                weights = group.get("weights") or {}
                if weights.get("type") == "float":
                    parts.append(float_group_part(name, group))
                    continue
                facts = {
                    "type": weights.get("type", "int"),
                    "bits": weights.get("num_bits"),
                    "symmetric": weights.get("symmetric", True),
                    "group_size": weights.get("group_size") if weights.get("strategy") == "group" else -1,
                    "activations": group.get("input_activations") is not None,
                }
                shape = scheme_words(facts)
                parts.append((f"compressed-tensors {name} ({shape})", "compressed-tensors", facts))
            parts.extend(expert_parts(config, quantization))
            parts.extend(fused_parts(quantization))
            kv = quantization.get("kv_cache_scheme")
            if kv:
                facts = {key: kv.get(key) for key in ("num_bits", "type", "strategy", "symmetric")}
                parts.append(
                    (f"KV cache ({kv.get('type')}{kv.get('num_bits')} per {kv.get('strategy')})", "ct-kv-cache", facts)
                )
        elif method == "gptq":
            parts.extend(gptq_parts(quantization))
        elif method == "compressor":
            parts.append((f"compressor native format ({quantization.get('format', 'lut')})", "compressor", {}))
            rotated = quantization.get("online_hadamard") or {}
            if rotated:
                parts.append((f"online Hadamard before down_proj ({len(rotated)} MLPs, rotate)", "online-hadamard", {}))
        else:
            parts.append((f"quant_method {method!r}", str(method), {}))
    if config.get("model_type") in ("deepseek_v3", "deepseek_v2") and config.get("kv_lora_rank"):
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        facts = {
            "kv_lora_rank": config["kv_lora_rank"],
            "qk_rope_head_dim": config.get("qk_rope_head_dim", 0),
            "rope_type": rope.get("rope_type"),
        }
        parts.append(
            (
                f"MLA attention (kv_lora_rank {facts['kv_lora_rank']} + qk_rope_head_dim {facts['qk_rope_head_dim']})",
                "deepseek-mla",
                facts,
            )
        )
    if config.get("model_type") in ("llama_swiftkv", "qwen2_swiftkv"):
        facts = {"model_type": config["model_type"], "group_size": config.get("key_value_group_size", 1)}
        parts.append(
            (
                f"SwiftKV attention (num_key_value_layers {config.get('num_key_value_layers')}, key_value_group_size "
                f"{facts['group_size']})",
                "swiftkv",
                facts,
            )
        )
    elif (
        "AutoModelForCausalLM" in (config.get("auto_map") or {})
        and (quantization or {}).get("quant_method") != "compressor"
    ):
        # (a native checkpoint's own model type only wraps the family for our quantizer: its part says it all)
        parts.append(
            (
                f"{config.get('model_type')} architecture ({config['auto_map']['AutoModelForCausalLM']})",
                "shipped-code",
                {},
            )
        )
    if not parts:
        parts.append((f"{config.get('model_type', 'unknown')} weights", "dense", {}))
    return parts


def gptq_parts(quantization: dict) -> list[tuple[str, str, dict]]:
    """A GPTQ checkpoint's own scheme, then each other scheme its positive ``dynamic`` rules give some layers
    (per-module overrides, ``export/gptq.py``): every one must be servable."""
    own = {
        "bits": quantization.get("bits"),
        "symmetric": quantization.get("sym", True),
        "group_size": quantization.get("group_size", -1),
        "format": quantization.get("checkpoint_format", "gptq"),
        "gptq_stack": gptq_stack_installed(),
        "override": False,
    }
    parts = [(f"GPTQ ({scheme_words(own)}, {own['format']})", "gptq", own)]
    overrides: dict[tuple, list] = {}
    for pattern, rule in (quantization.get("dynamic") or {}).items():
        if pattern.startswith("-:") or not {"bits", "group_size", "sym"} & set(rule):
            continue  # a dense module, or a rule that changes no scheme
        facts = own | {"bits": rule.get("bits", own["bits"]), "group_size": rule.get("group_size", own["group_size"])}
        facts |= {"symmetric": rule.get("sym", own["symmetric"]), "override": True}
        overrides.setdefault((facts["bits"], facts["group_size"], facts["symmetric"]), [facts, 0])[1] += 1
    for facts, rules in overrides.values():
        parts.append((f"GPTQ dynamic override ({scheme_words(facts)}, {rules} rules)", "gptq", facts))
    return parts


def fused_parts(quantization: dict) -> list[tuple[str, str, dict]]:
    """The linears vLLM fuses into one layer (``export/vllm_layers.py``: qkv_proj, gate_up_proj) among those a
    compressed-tensors config names one by one (per-module targets, ``ignore``): one group each, or a split."""
    from compressor.export.vllm_layers import vllm_layer

    group_of = {name: "ignore" for name in quantization.get("ignore") or []}
    for group_name, group in quantization.get("config_groups", {}).items():
        for target in group.get("targets", []):
            if target.startswith("re:"):
                group_of[re.sub(r"\\(.)", r"\1", target[3:]).strip("^$")] = group_name
    layers: dict[str, dict[str, str]] = {}
    for name, group_name in sorted(group_of.items()):
        layer = vllm_layer(name)
        if layer != name and not layer.endswith(".experts"):  # (the experts: ``expert_parts``)
            layers.setdefault(layer, {})[name.rpartition(".")[2]] = group_name
    if not any(len(members) > 1 for members in layers.values()):
        return []
    split = next(
        (
            f"{layer}: {', '.join(f'{member} in {group}' for member, group in members.items())}"
            for layer, members in layers.items()
            if len(set(members.values())) > 1
        ),
        None,
    )
    words = f"; {split}" if split is not None else ""
    return [(f"compressed-tensors layers vLLM fuses ({len(layers)}{words})", "ct-fused", {"split": split})]


MOE_WIDTHS = {"mixtral": "intermediate_size"}  # config key of an expert's width (else moe_intermediate_size)


def expert_parts(config: dict, quantization: dict) -> list[tuple[str, str, dict]]:
    """The quantized routed experts of a MoE model (compressed-tensors), one part per scheme: serving engines fuse a
    layer's experts, so every expert projection of a layer must share one scheme (layers may differ: vLLM resolves
    each FusedMoE layer's own, ``get_moe_method``), which the config groups covering ``.experts.`` modules say."""
    width = config.get(MOE_WIDTHS.get(config.get("model_type"), "moe_intermediate_size"))
    if not width or not any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        return []
    by_layer: dict[str, set[str]] = {}  # experts module ("*": every one, a "Linear" target) -> its schemes
    groups: dict[str, dict] = {}
    for group in quantization.get("config_groups", {}).values():
        scheme = json.dumps(group.get("weights"), sort_keys=True)
        for target in group.get("targets", []):
            name = re.sub(r"\\(.)", r"\1", target.removeprefix("re:"))  # a regex of one module name, unescaped
            expert = re.match(r"^\^?(.*\.experts)\.\d+\.", name)
            if target == "Linear" or expert is not None:
                by_layer.setdefault("*" if expert is None else expert[1], set()).add(scheme)
                groups[scheme] = group
    if not groups:
        return []
    most = max(len(schemes | by_layer.get("*", set())) for schemes in by_layer.values())
    parts = []
    for group in groups.values():
        weights = group.get("weights") or {}
        facts = {
            "schemes": most,
            "type": weights.get("type", "int"),
            "bits": weights.get("num_bits"),
            "symmetric": weights.get("symmetric", True),
            "group_size": weights.get("group_size") if weights.get("strategy") == "group" else -1,
            "activations": group.get("input_activations") is not None,
            "hidden_size": config.get("hidden_size", 0),
            "intermediate_size": width,
        }
        mixed = f", {most} schemes in one layer" if most > 1 else ""
        parts.append((f"routed experts ({scheme_words(facts)}, width {width}{mixed})", "moe-experts", facts))
    return parts


def float_group_part(name: str, group: dict) -> tuple[str, str, dict]:
    """A compressed-tensors group of float weights: FP8 (per channel or block), NVFP4 or MXFP4."""
    weights, activations = group["weights"], group.get("input_activations")
    if weights.get("num_bits") == 8:
        kind, words = "ct-fp8", f"FP8 per {weights.get('strategy')}"
    elif weights.get("strategy") == "tensor_group":
        kind, words = "ct-nvfp4", "NVFP4"
    else:
        kind, words = "ct-mxfp4", "MXFP4"
    if activations is not None:
        words += (
            f", {activations.get('type')}{activations.get('num_bits')} activations per {activations.get('strategy')}"
        )
    return f"compressed-tensors {name} ({words})", kind, {"activations": activations}


def gptq_stack_installed() -> bool:
    """Whether transformers can load GPTQ checkpoints here (the one verdict that depends on this machine)."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("optimum", "gptqmodel"))


def verdicts(config: dict, engines: tuple[str, ...] = ENGINES) -> list[Verdict]:
    results = []
    for description, kind, facts in checkpoint_parts(config):
        for engine in engines:
            route = next((r for r in ROUTES if r.engine == engine and r.kind == kind), None)
            if route is None:
                results.append(Verdict(engine, description, False, f"no rule knows {kind!r} for {engine}"))
                continue
            failed = next((rule for rule in route.requirements if not rule.holds(facts)), None)
            if failed is not None:
                results.append(Verdict(engine, description, False, f"needs {failed.says}", failed.source))
            else:
                caveats = [f"{c.says} [{c.source}]" for c in route.caveats if not c.holds(facts)]
                results.append(Verdict(engine, description, True, f"through {route.path}", caveats=caveats))
    return results


def check_checkpoint(path: str | Path, engines: tuple[str, ...] = ENGINES) -> list[Verdict]:
    from compressor.errors import UserError

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not a checkpoint folder (no config.json)")
    return verdicts(json.loads(config_file.read_text()), engines)
