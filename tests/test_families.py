"""Every family we read (issue 29): a tiny random model of each from its transformers config, run block by
block exactly as the model runs, compressed by every layer-step quantizer, exported, loaded, and computing
the logits of the model the session held in memory; structural steps only where their block is, refused in
one line elsewhere; the generic adapter accepting families with no row and refusing one it cannot prove."""

import json

import pytest
import torch
from safetensors import safe_open
from test_loaders import export_and_in_memory, tokens
from transformers import AutoConfig, AutoModelForCausalLM

from compressor import Recipe, apply
from compressor.arch import ADAPTERS, attention_geometry, norm_linear_groups
from compressor.blockwise import BlockwiseModel
from compressor.errors import UserError
from compressor.export import load_quantized_model
from compressor.model import ModelHandle
from compressor.pipeline import Session
from compressor.testing import TOKENIZER_TEXT, make_random_model

LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
NEW_FAMILIES = ("gemma2", "gemma3_text", "phi3", "olmo2", "granite", "glm4", "cohere", "stablelm")
GENERIC_FAMILIES = ("helium", "olmo3")  # no row in ADAPTERS: read through arch/generic.py
FAMILIES = LLAMA_FAMILIES + NEW_FAMILIES + GENERIC_FAMILIES


@pytest.fixture(scope="session")
def family_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {family: make_random_model(family, root / family) for family in NEW_FAMILIES + GENERIC_FAMILIES}
    built["phi"] = make_random_model("phi", root / "phi")
    built["stablelm_parallel"] = make_random_model("stablelm", root / "stablelm_parallel", use_parallel_residual=True)
    return {**tiny_models, **built}


@pytest.fixture(scope="session")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(TOKENIZER_TEXT * 4)
    return {"dataset": str(path), "samples": 4, "seq_len": 16}


def test_the_table_has_twelve_families_and_each_row_names_modules_its_model_has(family_models):
    assert {a.family for a in ADAPTERS} >= set(LLAMA_FAMILIES + NEW_FAMILIES)
    for adapter in ADAPTERS:
        if adapter.family not in family_models:
            continue
        config = AutoConfig.from_pretrained(family_models[adapter.family])
        model = AutoModelForCausalLM.from_config(config)
        modules = dict(model.get_submodule(f"{adapter.blocks}.0").named_modules())
        assert set(adapter.linears.values()) | set(adapter.norms.values()) | set(adapter.qk_norms.values()) <= set(
            modules
        )
        assert {adapter.attention, adapter.mlp} <= modules.keys()
        assert {adapter.embed_tokens, adapter.final_norm, adapter.lm_head} <= dict(model.named_modules()).keys()
        for fused, parts in adapter.fused.items():
            assert modules[adapter.linears[fused]].out_features in (
                2 * config.intermediate_size,  # gate_up
                (config.num_attention_heads + 2 * config.num_key_value_heads) * attention_geometry(config).head_dim,
            ), parts


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_block_by_block_is_the_model_itself(family, family_models):
    """The session's view of a model: hidden states the model hands its first block, each block run with the
    keyword arguments the model hands it (sliding-window and full layers differ), and the family's head
    (soft-capping, logit scales) give the model's own logits."""
    handle = ModelHandle.open(family_models[family])
    handle.materialize_all("cpu", torch.float32)
    ids = tokens()
    expected = handle.model(ids).logits
    torch.testing.assert_close(BlockwiseModel(handle, "cpu").logits(ids), expected, rtol=1e-5, atol=1e-5)
    if family in ("gemma2", "gemma3_text", "olmo3"):  # a window of 8 tokens in layer 0 only
        _, kwargs = BlockwiseModel(handle, "cpu").first_block_inputs(ids)
        sliding, full = kwargs[0]["attention_mask"], kwargs[1]["attention_mask"]
        assert sliding is not None and (full is None or not torch.equal(sliding, full))
    if family == "gemma3_text":  # local and global rotary bases
        _, kwargs = BlockwiseModel(handle, "cpu").first_block_inputs(ids)
        assert not torch.equal(kwargs[0]["position_embeddings"][0], kwargs[1]["position_embeddings"][0])


def layer_step_recipe(step, calibration):
    return Recipe.from_dict({"calibration": calibration, "steps": [step]})


LAYER_STEPS = {
    "rtn": {"rtn": {"bits": 4, "group_size": 32}},
    "efficientqat": {"efficientqat_block_ap": {"bits": 4, "group_size": 32, "epochs": 1, "symmetric": True}},
}


@torch.no_grad()
@pytest.mark.parametrize("method", LAYER_STEPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_exports_load_in_transformers_with_the_in_memory_logits(
    family, method, family_models, calibration, tmp_path, monkeypatch
):
    source, out = family_models[family], tmp_path / "out"
    memory = export_and_in_memory(layer_step_recipe(LAYER_STEPS[method], calibration), source, out, monkeypatch)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == AutoConfig.from_pretrained(source).model_type
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(out / "model.safetensors", "pt") as f:  # fused projections keep the checkpoint's names
        names = {name.rsplit(".", 1)[0] for name in f.keys()}
    with safe_open(source / "model.safetensors", "pt") as f:
        assert {name.rsplit(".", 1)[0] for name in f.keys()} <= names
    ids = tokens()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(loaded(ids).logits, memory(ids).logits, rtol=1e-4, atol=1e-4)


NATIVE_STEPS = {
    "gptq": {"gptq": {"bits": 3, "group_size": 32}},
    "squeezellm": {"squeezellm": {"bits": 3}},
    "lut-gptq": {"lut-gptq": {"bits": 3}},
    "qllm": {"qllm": {"bits": 4, "epochs": 1, "feature_samples": 2, "search_candidates": 4}},
    "bfp": {"bfp": {"k_bits": None, "weight_bits": 6}},
}


@torch.no_grad()
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_other_layer_quantizer_exports_what_it_held_in_memory(
    family, family_models, calibration, tmp_path, monkeypatch
):
    ids = tokens()
    for method, step in NATIVE_STEPS.items():
        out = tmp_path / method
        memory = export_and_in_memory(layer_step_recipe(step, calibration), family_models[family], out, monkeypatch)
        torch.testing.assert_close(load_quantized_model(out)(ids).logits, memory(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", ("gemma2", "phi3", "cohere"))
def test_the_bfp_kv_cache_sorts_each_layers_keys_and_loads(family, family_models, calibration, tmp_path):
    step = {"bfp": {"k_bits": 4, "ksort": "weight_norm"}}
    apply(layer_step_recipe(step, calibration), family_models[family], tmp_path / "out", progress=False)
    model = load_quantized_model(tmp_path / "out")
    perms = [layer.self_attn.k_perm for layer in model.model.layers]
    assert all(sorted(p.tolist()) == list(range(len(p))) for p in perms)
    assert torch.isfinite(model(tokens()).logits).all()


@torch.no_grad()
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_modegpt_exports_sliced_layers_with_the_in_memory_logits(
    family, family_models, calibration, tmp_path, monkeypatch
):
    step = {"modegpt": {"ratio": 0.2, "modules": ["vo", "mlp"]}}
    out = tmp_path / "out"
    memory = export_and_in_memory(layer_step_recipe(step, calibration), family_models[family], out, monkeypatch, False)
    assert json.loads((out / "config.json").read_text())["model_type"] == f"modegpt_{family}"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokens()
    torch.testing.assert_close(loaded(ids).logits, memory(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES + GENERIC_FAMILIES)
def test_structural_steps_refuse_other_blocks_in_one_line_before_any_work(family, family_models, calibration, tmp_path):
    for step in ({"transmla": {}}, {"swiftkv": {"epochs": 0}}, {"modegpt": {}}):
        name = next(iter(step))
        with pytest.raises(UserError) as refused:
            apply(layer_step_recipe(step, calibration), family_models[family], tmp_path / "out", progress=False)
        message = str(refused.value)
        assert "\n" not in message and f"steps[0].{name}: assumes the block of llama" in message
        assert f"{family} is not one of them" in message
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", GENERIC_FAMILIES + ("stablelm_parallel",))
def test_the_generic_adapter_accepts_what_its_probe_confirms(family, family_models, calibration, tmp_path):
    handle = ModelHandle.open(family_models[family])
    adapter = handle.adapter
    assert adapter.generic
    groups = {norm: set(paths) for norm, paths in norm_linear_groups(adapter).items()}
    raw = [{adapter.linears[r] for r in roles} for roles in adapter.raw_inputs]
    qkv = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    gate_up = {"mlp.gate_proj", "mlp.up_proj"}
    if family == "helium":  # pre-norm, Llama-like
        assert groups == {"input_layernorm": qkv, "post_attention_layernorm": gate_up} and not raw
    elif family == "olmo3":  # norms after the sublayers: both groups read the residual stream
        assert groups == {} and raw == [qkv, gate_up]
    else:  # one norm feeds attention and MLP in parallel
        assert groups == {"input_layernorm": qkv | gate_up}
    session = Session(handle, layer_step_recipe(LAYER_STEPS["rtn"], calibration), progress=False)
    session.run()
    assert "generic one, confirmed by a probe" in session.report.summary["architecture"]


def test_the_generic_adapter_refuses_what_it_cannot_prove_in_one_line(family_models, tmp_path):
    with pytest.raises(UserError) as refused:
        ModelHandle.open(family_models["phi"])
    message = str(refused.value)
    assert "\n" not in message
    assert "model_type 'phi' is not supported" in message and "the generic adapter cannot prove it" in message
    assert "self_attn.dense, mlp.fc1, mlp.fc2" in message and "no o_proj, gate_proj, up_proj, down_proj" in message


def test_native_format_steps_refuse_a_generic_family_before_any_work(family_models, calibration, tmp_path):
    with pytest.raises(UserError, match="steps\\[0\\].squeezellm: writes our native format, which has no model type"):
        apply(layer_step_recipe(NATIVE_STEPS["squeezellm"], calibration), family_models["helium"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
