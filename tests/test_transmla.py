"""TransMLA: exact GQA -> MLA at full rank, DeepSeek-V3 export, KV cache size, composition, healing."""

import inspect
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from compressor import Recipe, apply
from compressor.arch import UnsupportedArchitecture, attention_geometry
from compressor.arch.deepseek_mla import deepseek_v3_config, kv_cache_elements_per_token
from compressor.demo import demo_model_dir
from compressor.distill import coarse_kl
from compressor.errors import StepError
from compressor.export import load_quantized_model
from compressor.lowrank.transmla import MLAAttention, build_mla_attention, least_squares_norm_weight, transmla_weights
from compressor.model import ModelHandle
from compressor.modules.linear import QuantizedLinear
from compressor.pipeline import Session


def tokens(vocab=320, batch=2, length=40, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def convert_in_place(model, calibration, rope_dim, freqfold, rank, latent_norm=False, balance_kv=True):
    """Convert every attention of a loaded HF model with the step's math (grams from the original
    model's activations); ``latent_norm=False`` is the exact, norm-free variant."""
    geometry = attention_geometry(model.config)
    grams, inputs, hooks = {}, {}, []
    for index, layer in enumerate(model.model.layers):

        def hook(module, args, kwargs, index=index):
            hidden = kwargs["hidden_states"]
            z = torch.cat([module.k_proj(hidden), module.v_proj(hidden)], -1).flatten(0, 1).double()
            grams[index] = grams.get(index, 0) + z.T @ z
            inputs.setdefault(index, []).append(hidden)

        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(calibration)
    for h in hooks:
        h.remove()
    config = deepseek_v3_config(
        model.config,
        kv_lora_rank=rank,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=geometry.head_dim,
        v_head_dim=geometry.head_dim,
    )
    alphas = []
    for index, layer in enumerate(model.model.layers):
        a = layer.self_attn
        weights = transmla_weights(
            a.q_proj.weight,
            a.q_proj.bias,
            a.k_proj.weight,
            a.k_proj.bias,
            a.v_proj.weight,
            a.v_proj.bias,
            grams[index],
            num_heads=geometry.num_heads,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            rope_dim=rope_dim,
            freqfold=freqfold,
            kv_lora_rank=rank,
            balance_kv=balance_kv,
        )
        alphas.append(weights.alpha)
        gamma = None
        if latent_norm:
            with torch.no_grad():
                latents = [
                    torch.nn.functional.linear(h, weights.kv_a_weight, weights.kv_a_bias)[..., :rank]
                    for h in inputs[index]
                ]
            gamma = least_squares_norm_weight(latents, 1e-6)
        layer.self_attn = build_mla_attention(weights, config, index, a.o_proj, gamma)
    return model, alphas


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def mean_kl(reference, other):
    p = torch.log_softmax(reference, -1)
    return (p.exp() * (p - torch.log_softmax(other, -1))).sum(-1).mean().item()


def full_rank(model):
    g = attention_geometry(model.config)
    return g.num_kv_heads * g.head_dim  # rotary on every key dim, latent = the values


# ----------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "demo"])
def test_full_rank_conversion_equals_the_original(arch, tiny_models):
    path = demo_model_dir() if arch == "demo" else tiny_models[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.config.vocab_size
    x = tokens(vocab, seed=1)
    reference = logits(model, x)
    latent = full_rank(model)
    convert_in_place(model, tokens(vocab, seed=2), rope_dim=latent, freqfold=1, rank=latent)
    assert isinstance(model.model.layers[0].self_attn, MLAAttention)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    converted = logits(model, x)
    assert torch.allclose(converted, reference, atol=1e-4, rtol=0), (converted - reference).abs().max()


def test_pooling_unequal_frequencies_is_not_exact(tiny_llama):
    """FreqFold treats neighbouring frequencies as one: with rotary kept everywhere it must show."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    x = tokens()
    reference = logits(model, x)
    latent = full_rank(model)
    convert_in_place(model, tokens(seed=2), rope_dim=latent, freqfold=2, rank=latent)
    assert (logits(model, x) - reference).abs().max() > 1e-3


def test_balancing_keys_and_values_is_exact_at_full_rank(tiny_llama):
    results = []
    for balance in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        latent = full_rank(model)
        _, alphas = convert_in_place(
            model, tokens(seed=2), rope_dim=16, freqfold=4, rank=2 * latent - 16, balance_kv=balance
        )
        results.append(logits(model, tokens()))
    assert abs(alphas[0] - 1) > 1e-3  # balancing did rescale
    assert torch.allclose(results[0], results[1], atol=1e-4, rtol=0)


def test_error_falls_as_the_latent_grows(tiny_llama):
    x = tokens(seed=3)
    reference = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), x)
    kls = []
    for rank in (4, 16, 48, 112):  # 112 = 2 * 64 - 16: everything but the rotary dims
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        convert_in_place(model, tokens(length=128, seed=2), rope_dim=16, freqfold=4, rank=rank)
        kls.append(mean_kl(reference, logits(model, x)))
    assert kls == sorted(kls, reverse=True) and kls[0] > 2 * kls[-1], kls


def test_latent_norm_weight_makes_the_norm_the_identity_on_constant_rms_latents():
    direction = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1) * 8**0.5  # rms 1 each
    latents = [direction * 3.0]  # every token has rms 3
    gamma = least_squares_norm_weight(latents, eps=0.0)
    assert torch.allclose(gamma, torch.full((8,), 3.0), atol=1e-5)


def test_coarse_kl_is_the_full_kl_when_every_token_is_kept():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    logp = torch.log_softmax(teacher, -1)
    top = logp.topk(11, dim=-1)
    assert torch.allclose(
        coarse_kl(student, top.values, top.indices), torch.tensor(mean_kl(teacher, student)), atol=1e-5
    )
    assert coarse_kl(teacher, *logp.topk(3, dim=-1)).abs() < 1e-5  # zero against itself, any k


# ----------------------------------------------------------------------------------------------
# The step, export and KV cache


def recipe(*steps, samples=4, seq_len=64, **export):
    return Recipe.from_dict(
        {
            "calibration": {"dataset": "demo", "samples": samples, "seq_len": seq_len},
            "steps": list(steps),
            "export": export,
        }
    )


def run_in_memory(recipe_, model):
    handle = ModelHandle.open(model)
    session = Session(handle, recipe_, AutoTokenizer.from_pretrained(handle.path), progress=False)
    session.run()
    handle.materialize_all("cpu", torch.float32)
    for block in handle.blocks:
        block.to(torch.float32)
    return handle.model


@pytest.fixture(scope="module")
def demo_tokens():
    return tokens(4096, length=48, seed=5)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_export_loads_as_deepseek_v3_with_in_memory_logits_and_smaller_cache(ratio, tmp_path, demo_tokens):
    r = recipe({"transmla": {"kv_cache_ratio": ratio}}, dtype="float32")
    apply(r, "demo", tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["q_lora_rank"] is None and config["num_key_value_heads"] == config["num_attention_heads"] == 8
    assert config["qk_nope_head_dim"] == config["v_head_dim"] == 32 and config["first_k_dense_replace"] == 6
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == round(ratio * 128)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        assert f"model.layers.5.self_attn.{name}.weight" in names
    assert not any("k_proj" in n or "v_proj" in n for n in names)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    in_memory = run_in_memory(r, "demo")
    theirs, ours = logits(exported, demo_tokens), logits(in_memory, demo_tokens)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()

    # KV cache per token: counted from the config, and from the cache transformers fills
    original = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    assert kv_cache_elements_per_token(exported.config) == ratio * kv_cache_elements_per_token(original.config)

    def cached_per_token(model):
        cache = DynamicCache(config=model.config)
        # the keyword is `cache` from transformers 5.24 on (`past_key_values` is removed in 5.40)
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(demo_tokens[:1], use_cache=True, **{keyword: cache})
        return sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)

    assert (
        cached_per_token(exported) == ratio * cached_per_token(original) == kv_cache_elements_per_token(exported.config)
    )
    assert not torch.allclose(theirs, logits(original, demo_tokens), atol=1e-3)  # it did compress


def test_transmla_then_rtn_exports_and_loads(tiny_llama, tmp_path):
    steps = (
        {"transmla": {"kv_cache_ratio": 0.25}},
        {"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "kv_b_proj"]}},
    )
    r = Recipe.from_dict({"calibration": {"dataset": "demo", "samples": 4, "seq_len": 64}, "steps": list(steps)})
    apply(r, tiny_llama, tmp_path / "q", progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    quantization = config["quantization_config"]
    assert "model.layers.0.self_attn.kv_b_proj" in quantization["ignore"] and "lm_head" in quantization["ignore"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for name in ("q_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert f"model.layers.1.self_attn.{name}.weight_packed" in names
    assert "model.layers.1.self_attn.kv_b_proj.weight" in names

    ours = load_quantized_model(tmp_path / "q")
    assert isinstance(ours.model.layers[1].self_attn.kv_a_proj_with_mqa, QuantizedLinear)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    x = tokens()
    assert torch.allclose(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)

    apply(
        Recipe.from_dict({"calibration": {"dataset": "demo", "samples": 4, "seq_len": 64}, "steps": [steps[0]]}),
        tiny_llama,
        tmp_path / "d",
        progress=False,
    )
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    assert not torch.allclose(logits(dense, x), logits(ours, x), atol=1e-4)  # RTN did quantize the MLA layers


def test_refuses_what_deepseek_v3_cannot_hold(tiny_models, tmp_path):
    with pytest.raises(StepError, match=r"steps\[0\]\.transmla: assumes the block of llama, mistral, qwen2; qwen3 is"):
        apply(recipe({"transmla": {}}), tiny_models["qwen3"], tmp_path / "a", progress=False)
    with pytest.raises(UnsupportedArchitecture, match="q_proj has a bias"):
        apply(recipe({"transmla": {}}), tiny_models["qwen2"], tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kv_lora_rank": 500}, "transmla.kv_lora_rank: 500 is outside"),
        ({"qk_rope_head_dim": 12}, "transmla.qk_rope_head_dim: 12 does not divide head_dim 32"),
        ({"qk_rope_head_dim": 16, "freqfold": 3}, "transmla.freqfold: 3 does not fit"),
        ({"kv_cache_ratio": 0.01}, "transmla.kv_lora_rank"),
    ],
)
def test_bad_sizes_are_one_line_errors(settings, message, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=message):
        apply(recipe({"transmla": settings}), tiny_llama, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"qk_rope_head_dim": 64}, r"steps\[0\]\.transmla\.qk_rope_head_dim: 64 does not divide head_dim 32"),
        (
            {"exact": True, "kv_cache_ratio": 0.25},
            r"steps\[0\]\.transmla\.kv_cache_ratio: exact keeps all 64 rotary key dims",
        ),
        ({"exact": True, "qk_rope_head_dim": 32}, r"steps\[0\]\.transmla\.exact: keeps every rotary key dim"),
    ],
)
def test_bad_settings_are_refused_naming_the_file_and_step_before_the_weights_load(
    settings, message, tiny_llama, tmp_path, monkeypatch
):
    file = tmp_path / "mla.yaml"
    file.write_text(
        json.dumps({"calibration": {"dataset": "demo", "samples": 2, "seq_len": 32}, "steps": [{"transmla": settings}]})
    )
    monkeypatch.setattr(ModelHandle, "materialize", lambda *a, **k: pytest.fail("weights were read before the refusal"))
    with pytest.raises(StepError, match=f"^{file}: {message}"):
        apply(Recipe.from_yaml(file), tiny_llama, tmp_path / "out", progress=False)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_exact_full_rank_export_equals_the_original_in_plain_transformers(arch, tiny_models, tmp_path):
    """Every rotary key dim of every kv head keeps RoPE (the shared rotary key is kv_heads x head_dim wide,
    its repeated frequencies written as longrope factors) and the latent sits where kv_a_layernorm is
    linear: stock DeepseekV3ForCausalLM then computes the original model."""
    report = apply(
        recipe({"transmla": {"kv_cache_ratio": 1.0, "exact": True}}),
        tiny_models[arch],
        tmp_path / "out",
        progress=False,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["qk_rope_head_dim"] == 64 and config["kv_lora_rank"] == 64 and config["model_type"] == "deepseek_v3"
    assert (config.get("rope_parameters") or config["rope_scaling"])["rope_type"] == "longrope"
    rows = [row for row in report.rows if "rope_energy" in row]
    assert len(rows) == 2 and all(row["rope_energy"] == 1.0 and row["latent_norm_error"] < 1e-6 for row in rows)
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    torch.testing.assert_close(logits(exported, x), logits(original, x), rtol=1e-4, atol=1e-4)


def test_the_default_layout_reports_what_it_loses(tiny_llama, tmp_path):
    """At full rank the servable layout keeps RoPE on head_dim of the kv_heads x head_dim rotary key dims
    and fits the latent norm: both losses are in the report, and the export is not the original."""
    report = apply(recipe({"transmla": {"kv_cache_ratio": 1.0}}), tiny_llama, tmp_path / "out", progress=False)
    rows = [row for row in report.rows if "rope_energy" in row]
    assert all(row["rope_energy"] < 0.95 and row["latent_norm_error"] > 1e-3 for row in rows)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"


def test_healing_lowers_the_distance_to_the_original(tiny_llama, tmp_path):
    """On the calibration text itself (heldout: 0): six epochs on eight random-model sequences overfit
    them, and with a held-out split the step would rightly keep the unhealed start (tests/test_efficientqat.py
    checks that rule on E2E-QP; both use compressor.training)."""
    calibration = {"dataset": "demo", "samples": 8, "seq_len": 48}
    x = Session(
        ModelHandle.open(tiny_llama),
        Recipe.from_dict({"calibration": calibration, "steps": ["transmla"]}),
        AutoTokenizer.from_pretrained(tiny_llama),
    ).calibration_tokens()
    reference = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), x)
    kls = []
    for heal in (False, True):
        steps = [{"transmla": {"kv_cache_ratio": 0.25}}] + (
            [{"transmla_heal": {"epochs": 6, "lr": 1e-3, "batch_size": 2, "heldout": 0.0}}] if heal else []
        )
        report = apply(
            Recipe.from_dict({"calibration": calibration, "steps": steps}),
            tiny_llama,
            tmp_path / str(heal),
            progress=False,
        )
        kls.append(
            mean_kl(
                reference, logits(AutoModelForCausalLM.from_pretrained(tmp_path / str(heal), dtype=torch.float32), x)
            )
        )
    row = next(r for r in report.rows if r["step"] == "transmla_heal")
    assert row["last_epoch_kl"] < row["first_epoch_kl"]
    assert kls[1] < 0.85 * kls[0], kls


def test_serving_vllm_picks_sizes_vllms_mla_accepts(tmp_path):
    from compressor.serving import check_checkpoint
    from compressor.testing import make_random_model

    source = make_random_model(
        "llama", tmp_path / "wide", hidden_size=256, num_attention_heads=4, num_key_value_heads=4
    )  # 2 x 4 x 64 cached
    apply(recipe({"transmla": {"serving": "vllm"}}), source, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (
        256,
        64,
    )  # 576 does not fit under 512 numbers a token
    assert all(v.loads for v in check_checkpoint(tmp_path / "out"))


def test_serving_vllm_is_refused_where_no_accepted_size_saves_cache(tiny_llama, tmp_path):
    with pytest.raises(
        StepError, match=r"transmla\.serving: vllm needs kv_lora_rank \+ qk_rope_head_dim of 576 or 320"
    ):
        apply(recipe({"transmla": {"serving": "vllm"}}), tiny_llama, tmp_path / "out", progress=False)
