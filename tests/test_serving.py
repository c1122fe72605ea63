"""``compressor check``: the serving verdicts follow the rules table, and for transformers they agree
with what plain ``from_pretrained`` actually does on our exports."""

import json

import pytest
from click.testing import CliRunner

from compressor import Recipe, apply
from compressor.cli import main
from compressor.serving import verdicts


def ct_config(bits, symmetric, group_size=128):
    weights = {"type": "int", "num_bits": bits, "symmetric": symmetric, "strategy": "group", "group_size": group_size}
    return {
        "model_type": "llama",
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"weights": weights, "input_activations": None}},
        },
    }


def by_engine(config):
    return {v.engine: v for v in verdicts(config)}


def test_symmetric_4_bit_loads_everywhere_on_the_fast_paths():
    found = by_engine(ct_config(4, True))
    assert found["vllm"].loads and "CompressedTensorsWNA16" in found["vllm"].how and not found["vllm"].caveats
    assert found["transformers"].loads and not found["transformers"].caveats


def test_asymmetric_sub_4_bit_is_refused_by_both_with_the_reason_and_source():
    found = by_engine(ct_config(3, False))
    assert (
        not found["vllm"].loads
        and "only at 4 or 8 bits" in found["vllm"].how
        and "compressed_tensors_wNa16.py" in found["vllm"].source
    )
    assert not found["transformers"].loads and "symmetric weights" in found["transformers"].how


def test_symmetric_3_bit_loads_with_the_caveats_that_apply():
    found = by_engine(ct_config(3, True, group_size=96))
    assert found["vllm"].loads and any("newest releases" in c for c in found["vllm"].caveats)
    assert any("group sizes -1, 32, 64, 128" in c for c in found["vllm"].caveats)
    assert found["transformers"].loads and any(">= 0.18" in c for c in found["transformers"].caveats)


def test_native_mla_and_dense():
    native = by_engine({"model_type": "llama", "quantization_config": {"quant_method": "compressor", "format": "lut"}})
    assert (
        native["transformers"].loads and "import compressor" in native["transformers"].how and not native["vllm"].loads
    )
    small = verdicts({"model_type": "deepseek_v3", "kv_lora_rank": 16, "qk_rope_head_dim": 16})
    assert [v.loads for v in small] == [False, True] and "576 or 320" in small[0].how
    assert all(v.loads for v in verdicts({"model_type": "deepseek_v3", "kv_lora_rank": 512, "qk_rope_head_dim": 64}))
    assert all(v.loads for v in verdicts({"model_type": "qwen2"}))
    unknown = verdicts({"model_type": "llama", "quantization_config": {"quant_method": "mystery"}})
    assert not any(v.loads for v in unknown) and "no rule knows 'mystery'" in unknown[0].how


@pytest.mark.parametrize(
    "bits, symmetric, format",
    [(4, True, "auto"), (3, True, "auto"), (3, False, "auto"), (3, False, "compressed-tensors"), (4, True, "gptq")],
)
def test_the_transformers_verdict_is_what_from_pretrained_does(tiny_llama, tmp_path, bits, symmetric, format):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    recipe = {
        "steps": [{"rtn": {"bits": bits, "group_size": 32, "symmetric": symmetric}}],
        "export": {"format": format},
    }
    apply(Recipe.from_dict(recipe), tiny_llama, out, progress=False)
    verdict = by_engine(json.loads((out / "config.json").read_text()))["transformers"]
    try:
        AutoModelForCausalLM.from_pretrained(out)
        loaded = True
    except Exception:
        loaded = False
    assert loaded == verdict.loads, verdict.line()


def test_check_command_and_apply_print_the_verdicts(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - rtn: {bits: 3, group_size: 32, symmetric: false}\n")
    applied = CliRunner().invoke(main, ["apply", str(recipe), str(tiny_llama), "-o", str(tmp_path / "out"), "--quiet"])
    assert (
        applied.exit_code == 0
        and "serving (compressor check):" in applied.output
        and "vllm: GPTQ (3-bit asymmetric" in applied.output
    )
    checked = CliRunner().invoke(main, ["check", str(tmp_path / "out"), "--engine", "vllm"])
    assert checked.exit_code == 1 and checked.output.startswith("vllm: GPTQ (3-bit asymmetric, group 32, gptq_v2): NO")
    missing = CliRunner().invoke(main, ["check", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a checkpoint folder" in missing.output


@pytest.mark.parametrize(
    "step,vllm_loads,vllm_words,transformers_caveat",
    [
        (
            {"grid": "fp8", "activation_grid": "fp8", "quantize_attention": False},
            True,
            "CompressedTensorsW8A8Fp8",
            None,
        ),
        ({"grid": "nvfp4"}, True, "CompressedTensorsW4A16Fp4", "bfloat16"),
        ({"grid": "mxfp4", "activation_grid": "mxfp4", "quantize_attention": False}, True, "W4A16Mxfp4", "bfloat16"),
    ],
)
def test_float_exports_get_verdicts_with_their_sources(
    step, vllm_loads, vllm_words, transformers_caveat, tiny_llama, tmp_path
):
    apply(Recipe.from_dict({"steps": [{"rtn": step}]}), tiny_llama, tmp_path / "out", progress=False)
    found = by_engine(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert found["vllm"].loads == vllm_loads and vllm_words in found["vllm"].how
    assert found["transformers"].loads
    caveats = " ".join(found["transformers"].caveats)
    assert (transformers_caveat in caveats) if transformers_caveat else not caveats
    if "activation_grid" in step and step["grid"] == "mxfp4":  # vLLM serves MXFP4 weight-only: said, with the source
        assert any("weight-only" in c and "compressed_tensors.py" in c for c in found["vllm"].caveats)


def test_nvfp4_w4a4_is_native_and_vllm_says_no():
    config = {"model_type": "llama", "quantization_config": {"quant_method": "compressor", "format": "float"}}
    found = by_engine(config)
    assert not found["vllm"].loads and found["transformers"].loads


def test_nvfp4_w4a4_with_input_global_scales_and_an_fp8_kv_cache_get_verdicts():
    """compressed-tensors' NVFP4 W4A4 (calibrated input_global_scale) and a kv_cache_scheme: vLLM serves both;
    transformers loads the weights and says it leaves the cache 16-bit, with the source."""
    activations = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": "local"}
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    quantization = {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"weights": weights, "input_activations": activations, "targets": ["Linear"]}},
        "kv_cache_scheme": kv,
    }
    found = verdicts({"model_type": "llama", "quantization_config": quantization})
    lines = {(v.engine, v.part.split(" (")[0]): v for v in found}
    assert (
        lines["vllm", "compressed-tensors group_0"].loads
        and "W4A4Fp4" in lines["vllm", "compressed-tensors group_0"].how
    )
    assert lines["vllm", "KV cache"].loads and "k_scale" in lines["vllm", "KV cache"].how
    assert lines["transformers", "KV cache"].loads and "initialize.py" in " ".join(
        lines["transformers", "KV cache"].caveats
    )
    dynamic = {
        **quantization,
        "config_groups": {
            "group_0": {
                "weights": weights,
                "targets": ["Linear"],
                "input_activations": {**activations, "dynamic": True},
            }
        },
    }
    refused = [v for v in verdicts({"model_type": "llama", "quantization_config": dynamic}) if v.engine == "vllm"]
    assert not refused[0].loads and "input_global_scale" in refused[0].how
    per_head = {**quantization, "kv_cache_scheme": {**kv, "strategy": "attn_head"}}
    kv_verdict = [v for v in verdicts({"model_type": "llama", "quantization_config": per_head}) if "KV" in v.part]
    assert not kv_verdict[0].loads and "compressed_tensors_kv.py" in kv_verdict[0].source
