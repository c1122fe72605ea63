"""Mixed precision in one checkpoint: linears of one model at different (bits, group size), as a bit allocation
leaves them, export and load back with the logits of the model the session held. GPTQ writes the other schemes
as ``dynamic`` rules that vLLM (which matches its fused layer names) and GPTQModel (the checkpoint's names) both
apply; compressed-tensors writes one config group per scheme."""

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_loaders import export_and_in_memory, tokens
from transformers import AutoModelForCausalLM

from compressor import Recipe, apply
from compressor.export import ExportError, gptq, load_quantized_model
from compressor.quant.uniform import UniformQuantizer, quantize_uniform
from compressor.serving import verdicts

# full module name (regex) -> (bits, group size); every other linear takes the step's bits/group_size (2, 64)
MIXED = (
    (r"model\.layers\.0\.self_attn\.[qkv]_proj", (8, 64)),
    (r"model\.layers\.1\.mlp\.down_proj", (4, 32)),
)


def register_mixed(registered, name: str, table) -> None:
    """A test quantizer that gives each linear the scheme ``table`` names (as a bit allocation would, with
    ``allocates`` and ``candidate_schemes`` as ``quant/allocation.py`` has them), rounded to nearest."""

    @registered(name)
    @dataclass
    class MixedRTN(UniformQuantizer):
        """Test step: RTN at a scheme per linear."""

        needs_calibration = False
        allocates: ClassVar[bool] = True
        schemes_of: ClassVar[tuple] = table

        def candidate_schemes(self, in_features):
            return [(self.bits, self.group_size), *(scheme for _, scheme in self.schemes_of)]

        def scheme(self, name):
            return next((s for pattern, s in self.schemes_of if re.fullmatch(pattern, name)), None) or (
                self.bits,
                self.group_size,
            )

        def compress_block(self, context):
            for name, linear in context.linears(self.ignore).items():
                bits, group_size = self.scheme(f"{context.prefix}.{name}")
                weight = quantize_uniform(linear.weight.data, bits, group_size, self.symmetric, torch.float16)
                context.replace_linear(name, weight)


def recipe(symmetric: bool, step: str = "mixed_rtn", **export) -> Recipe:
    return Recipe.from_dict(
        {"steps": [{step: {"bits": 2, "group_size": 64, "symmetric": symmetric}}], "export": export}
    )


def vllm_dynamic_override(dynamic: dict, layer_name: str):
    """vLLM's ``get_dynamic_override`` (vllm/model_executor/layers/quantization/utils/gptq_utils.py), written out:
    the first rule whose regex ``re.match``es the layer's name; False for a negative one, None when none does."""
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), layer_name):
                return False
        elif re.match(pattern.removeprefix("+:"), layer_name):
            return overrides
    return None


def expected_scheme(name: str) -> tuple[int, int]:
    return next((s for pattern, s in MIXED if re.fullmatch(pattern, name)), (2, 64))


@torch.no_grad()
@pytest.mark.parametrize("format", ["gptq", "auto"])
def test_asymmetric_mixed_schemes_export_as_gptq_and_load_with_the_in_memory_logits(
    format, tiny_llama, tmp_path, registered, monkeypatch
):
    register_mixed(registered, "mixed_rtn", MIXED)
    export = {"format": format} if format != "auto" else {}
    memory = export_and_in_memory(recipe(False, **export), tiny_llama, tmp_path / "out", monkeypatch)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    # 2-bit group 64 covers the most weights; 'auto' keeps the 8- and 4-bit asymmetric layers in GPTQ with them
    assert config["quant_method"] == "gptq" and (config["bits"], config["group_size"]) == (2, 64)
    assert config["sym"] is False and config["checkpoint_format"] == "gptq_v2"
    assert len(config["dynamic"]) == 2  # layer 0's qkv_proj, layer 1's down_proj

    dynamic = config["dynamic"]
    vllm_layers = {  # the names vLLM's Llama gives its layers (qkv_proj and gate_up_proj fused)
        f"model.layers.{i}.{path}": (i, path)
        for i in (0, 1)
        for path in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    }
    for layer in vllm_layers:
        rule = vllm_dynamic_override(dynamic, layer)
        scheme = (rule["bits"], rule["group_size"]) if rule else (config["bits"], config["group_size"])
        member = layer.replace("qkv_proj", "q_proj").replace("gate_up_proj", "up_proj")
        assert scheme == expected_scheme(member), layer
    loaded = load_quantized_model(tmp_path / "out")
    for name, module in loaded.named_modules():
        if hasattr(module, "quantized_weight"):
            rule = vllm_dynamic_override(dynamic, name)  # GPTQModel matches the checkpoint's names the same way
            scheme = (rule["bits"], rule["group_size"]) if rule else (config["bits"], config["group_size"])
            weight = module.quantized_weight
            assert scheme == (weight.bits, weight.group_size) == expected_scheme(name), name
            assert weight.zeros is not None
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)

    engines = {v.part: v for v in verdicts(json.loads((tmp_path / "out" / "config.json").read_text()))}
    assert not any(v.loads for v in engines.values())  # asymmetric: no Marlin; overrides: not transformers
    assert "GPTQ dynamic override (8-bit asymmetric, group 64, 1 rules)" in engines


@torch.no_grad()
def test_symmetric_mixed_schemes_export_as_compressed_tensors_and_load_in_transformers(
    tiny_llama, tmp_path, registered, monkeypatch
):
    register_mixed(registered, "mixed_rtn", MIXED)
    memory = export_and_in_memory(recipe(True), tiny_llama, tmp_path / "out", monkeypatch)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and len(config["config_groups"]) == 3
    for group in config["config_groups"].values():
        weights = group["weights"]
        for target in group["targets"]:
            name = re.fullmatch(r"re:\^(.*)\$", target)[1].replace("\\", "")
            assert (weights["num_bits"], weights["group_size"]) == expected_scheme(name), target
    x = tokens()
    expected = memory(x).logits
    torch.testing.assert_close(load_quantized_model(tmp_path / "out")(x).logits, expected, rtol=1e-5, atol=1e-5)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-5, atol=1e-5)

    checkpoint = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(v.loads for v in verdicts(checkpoint))  # 2-bit: vLLM's newest releases (a caveat)
    groups = checkpoint["quantization_config"]["config_groups"]
    eight = next(g for g in groups.values() if g["weights"]["num_bits"] == 8)
    moved = r"re:^model\.layers\.0\.self_attn\.k_proj$"
    eight["targets"].remove(moved)
    next(g for g in groups.values() if g["weights"]["num_bits"] == 2)["targets"].append(moved)
    split = [v for v in verdicts(checkpoint, ("vllm",)) if "layers vLLM fuses" in v.part]
    assert len(split) == 1 and not split[0].loads and "model.layers.0.self_attn.qkv_proj: k_proj in" in split[0].part


def test_a_fused_layer_with_two_schemes_is_refused_in_one_line(tiny_llama, tmp_path, registered):
    register_mixed(registered, "split_rtn", ((r"model\.layers\.1\.mlp\.gate_proj", (8, 64)),))
    with pytest.raises(ExportError) as refused:
        apply(recipe(False, "split_rtn", format="gptq"), tiny_llama, tmp_path / "out", progress=False)
    message = str(refused.value)
    assert "\n" not in message and not (tmp_path / "out").exists()
    assert message.startswith("export format 'gptq': model.layers.1.mlp.gate_up_proj: vLLM serves ")
    assert "as one layer, which takes one scheme (2-bit group 64: up_proj; 8-bit group 64: gate_proj)" in message


def test_a_candidate_scheme_gptq_cannot_hold_is_refused_before_any_work(tiny_llama, tmp_path, registered):
    from compressor.errors import StepError

    register_mixed(registered, "w5_rtn", ((r"model\.layers\.1\.mlp\.down_proj", (5, 64)),))
    with pytest.raises(StepError, match=r"steps\[0\]\.w5_rtn: schemes: 5-bit weights have no GPTQ layout"):
        apply(recipe(False, "w5_rtn", format="gptq"), tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_a_moe_layers_experts_take_their_own_scheme_through_gptq(tmp_path, registered, monkeypatch):
    """Mixtral: layer 0's experts at 8 bits, the rest at 2; the checkpoint names them ``block_sparse_moe``."""
    from compressor.testing import make_random_model

    source = make_random_model("mixtral", tmp_path / "mixtral")
    register_mixed(registered, "moe_rtn", ((r"model\.layers\.0\.mlp\.experts\.\d+\.w[123]", (8, 64)),))
    memory = export_and_in_memory(recipe(False, "moe_rtn"), source, tmp_path / "out", monkeypatch)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and (config["bits"], config["group_size"]) == (2, 64)
    rules = config["dynamic"]
    for name in ("model.layers.0.block_sparse_moe.experts", "model.layers.0.block_sparse_moe.experts.2.w3"):
        assert vllm_dynamic_override(rules, name) == {"bits": 8, "group_size": 64}, name
    assert vllm_dynamic_override(rules, "model.layers.1.block_sparse_moe.experts") is None
    assert vllm_dynamic_override(rules, "model.layers.1.block_sparse_moe.experts.2.w3") is None
    loaded = load_quantized_model(tmp_path / "out")
    assert loaded.model.layers[0].mlp.experts[1].w2.quantized_weight.bits == 8
    assert loaded.model.layers[1].mlp.experts[1].w2.quantized_weight.bits == 2
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_symmetric_experts_of_one_layer_at_another_scheme_export_as_compressed_tensors(
    tmp_path, registered, monkeypatch
):
    """vLLM resolves each MoE layer's scheme from ``{experts}.0.gate_proj`` (``get_moe_method``): Mixtral's ``w1``
    targets name that too, and layers of different schemes are servable, two schemes in one layer are not."""
    from compressor.testing import make_random_model

    source = make_random_model("mixtral", tmp_path / "mixtral")
    register_mixed(registered, "moe_rtn", ((r"model\.layers\.0\.mlp\.experts\.\d+\.w[123]", (8, 64)),))
    steps = [{"moe_rtn": {"bits": 4, "group_size": 64, "symmetric": True}}]
    memory = export_and_in_memory(Recipe.from_dict({"steps": steps}), source, tmp_path / "out", monkeypatch)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"].values()

    def vllm_bits(layer_name):  # the group whose targets match the name vLLM looks the scheme up by
        (bits,) = [g["weights"]["num_bits"] for g in groups if any(re.match(t[3:], layer_name) for t in g["targets"])]
        return bits

    for layer, bits in ((0, 8), (1, 4)):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert vllm_bits(f"model.layers.{layer}.block_sparse_moe.experts.0.{projection}") == bits
    experts = [v for v in verdicts(config, ("vllm",)) if v.part.startswith("routed experts")]
    assert len(experts) == 2 and all(v.loads for v in experts)
    x = tokens()
    torch.testing.assert_close(load_quantized_model(tmp_path / "out")(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)

    one_layer = next(g for g in groups if g["weights"]["num_bits"] == 8)
    one_layer["targets"].append(r"re:^model\.layers\.1\.block_sparse_moe\.experts\.0\.(?:w2|down_proj)$")
    refused = [v for v in verdicts(config, ("vllm",)) if v.part.startswith("routed experts")]
    assert not any(v.loads for v in refused) and "of a layer" in refused[0].how


def entry(bits, group_size, symmetric=False, weights=128 * 128):
    return {
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "checkpoint_format": "gptq" if symmetric else "gptq_v2",
        "weights": weights,
    }


def test_expert_rules_match_vllms_fused_moe_layer_and_every_expert():
    """vLLM serves a MoE layer's experts as one FusedMoE layer named after the experts module (Mixtral's
    ``block_sparse_moe.experts``), GPTQModel each expert projection by its own name."""
    modules = {}
    for layer, bits in ((0, 8), (1, 2)):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        modules |= {f"{prefix}.{e}.{p}": entry(bits, 64) for e in range(4) for p in ("w1", "w2", "w3")}
        attention = f"model.layers.{layer}.self_attn"
        modules |= {f"{attention}.{p}": entry(2, 64) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    config = gptq.quantization_config(modules, ["lm_head", "model.layers.0.block_sparse_moe.gate"])
    assert (config["bits"], config["group_size"]) == (2, 64)
    rules = config["dynamic"]
    for name in ("model.layers.0.block_sparse_moe.experts", "model.layers.0.block_sparse_moe.experts.3.w2"):
        assert vllm_dynamic_override(rules, name) == {"bits": 8, "group_size": 64}, name
    for name in ("model.layers.1.block_sparse_moe.experts", "model.layers.1.block_sparse_moe.experts.0.w1"):
        assert vllm_dynamic_override(rules, name) is None, name
    assert vllm_dynamic_override(rules, "model.layers.0.block_sparse_moe.gate") is False  # the dense router
    assert vllm_dynamic_override(rules, "model.layers.0.self_attn.qkv_proj") is None
    for name in modules:
        scheme = gptq.module_scheme(config, name)
        assert scheme == (modules[name]["bits"], modules[name]["group_size"], False), name

    modules["model.layers.1.block_sparse_moe.experts.2.w3"] = entry(4, 64)
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.block_sparse_moe\.experts: vLLM serves .* one scheme"):
        gptq.quantization_config(modules, [])
    modules["model.layers.1.block_sparse_moe.experts.2.w3"] = entry(2, 64, symmetric=True)
    with pytest.raises(ValueError, match="a GPTQ config has one `sym`"):
        gptq.quantization_config(modules, [])


def test_the_serving_check_reads_every_scheme_of_a_mixed_gptq_config():
    def config(override_bits):
        return {
            "model_type": "llama",
            "quantization_config": {
                "quant_method": "gptq",
                "bits": 4,
                "group_size": 128,
                "sym": True,
                "checkpoint_format": "gptq",
                "dynamic": {
                    r"-:^model\.layers\.0\.mlp\.down_proj$": {},
                    r"+:^model\.layers\.1\.self_attn\.(?:k_proj|q_proj|qkv_proj|v_proj)$": {
                        "bits": override_bits,
                        "group_size": 128,
                    },
                },
            },
        }

    served = [v for v in verdicts(config(8)) if v.engine == "vllm"]
    assert [v.part for v in served] == [
        "GPTQ (4-bit symmetric, group 128, gptq)",
        "GPTQ dynamic override (8-bit symmetric, group 128, 1 rules)",
    ]
    assert all(v.loads for v in served)
    transformers = [v for v in verdicts(config(8)) if v.engine == "transformers"]
    assert not transformers[1].loads and "drops the config's `dynamic`" in transformers[1].how
    refused = [v for v in verdicts(config(3)) if v.engine == "vllm"]
    assert refused[0].loads and not refused[1].loads  # Marlin takes 4/8-bit symmetric weights only
