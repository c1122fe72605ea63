"""SwiftKV: exact identities of the rewiring, the skipping prefill and its cache, the block-by-block
training path against the model-level one, export and load, distillation, composition, bad settings."""

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from compressor import Recipe, apply
from compressor.arch import adapter_for
from compressor.arch.swiftkv import kv_cache_bytes, swiftkv_config
from compressor.arch.swiftkv.modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, Qwen2SwiftKVForCausalLM
from compressor.blockwise import BlockwiseModel
from compressor.errors import StepError
from compressor.export import load_quantized_model
from compressor.lowrank.swiftkv import SwiftKVCarryLayer, initialise_swiftkv, kv_cache_layers, kv_cache_reduction
from compressor.modules.linear import QuantizedLinear
from compressor.testing import random_config

CLASSES = {"llama": LlamaSwiftKVForCausalLM, "qwen2": Qwen2SwiftKVForCausalLM}


def sensitive_base(arch="llama", layers=4, seed=0):
    """A random model whose weights are large enough that every path changes the logits visibly."""
    torch.manual_seed(seed)
    config = random_config(
        arch,
        num_hidden_layers=layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            else:
                p.normal_(0, 0.1)
    return model


def swiftkv_of(base, first, group=1, init=True, seed=1):
    """The SwiftKV model over ``base``'s weights: initialised as the step does, or random new weights."""
    config = swiftkv_config(base.config, first, group)
    model = CLASSES[base.config.model_type](config).eval()
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all("swiftkv" in name for name in missing)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in missing:
            parameter = model.get_parameter(name)
            parameter.copy_(torch.randn_like(parameter) / (parameter.shape[-1] ** 0.5 if parameter.dim() == 2 else 10))
        if init and first < config.num_hidden_layers:
            model.model.norm_swiftkv.weight.copy_(model.model.layers[first].input_layernorm.weight)
            initialise_swiftkv(
                {i: model.model.layers[i].self_attn for i in range(first, config.num_hidden_layers)}, config
            )
    return model


def ids(batch=2, length=12, seed=0, vocab=320):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, tokens, **kwargs):
    return model(tokens, **kwargs).logits


# ----------------------------------------------------------------------------------------------
# Exact identities (swiftkv.md section 7)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_teacher_path_and_m_equal_to_n_are_the_base_model(arch):
    base = sensitive_base(arch)
    tokens = ids()
    model = swiftkv_of(base, 2, init=False)
    model.config.swiftkv = False  # the teacher: original projections everywhere, new weights ignored
    assert torch.equal(logits(model, tokens), logits(base, tokens))
    untouched = swiftkv_of(base, 4)  # M = N: nothing rewired
    assert (logits(untouched, tokens) - logits(base, tokens)).abs().max() < 1e-5


def test_layers_before_m_see_the_base_model_streams():
    base = sensitive_base()
    model = swiftkv_of(base, 2, init=False)
    seen = {}
    # h_M: what the base's layer M receives, and what SwiftKV normalises for every upper layer's keys and values
    for name, module in (("base", base.model.layers[2]), ("swiftkv", model.model.norm_swiftkv)):
        hook = module.register_forward_pre_hook(
            lambda mod, args, kw, name=name: seen.__setitem__(name, (args or (kw["hidden_states"],))[0]),
            with_kwargs=True,
        )
        logits(base if name == "base" else model, ids())
        hook.remove()
    assert torch.equal(seen["base"], seen["swiftkv"])  # h_M: the stream SwiftKV takes keys and values from


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_last_layer_alone_rewired_from_its_own_input_is_exact(arch):
    base = sensitive_base(arch)
    tokens = ids()
    model = swiftkv_of(base, 3)  # M = N - 1: norm_swiftkv = the last layer's input norm, q/k/v copied
    assert (logits(model, tokens) - logits(base, tokens)).abs().max() < 1e-5
    half = swiftkv_of(base, 2)  # at M = N/2 the same initialisation is an approximation
    assert (logits(half, tokens) - logits(base, tokens)).abs().max() > 1e-2


def test_acrosskv_initialises_leaders_with_the_group_mean_and_stores_one_entry_per_group():
    base = sensitive_base(layers=6)
    model = swiftkv_of(base, 2, group=2)
    layers = model.model.layers
    for leader in (2, 4):
        for role in ("k_proj", "v_proj"):
            mean = (
                getattr(base.model.layers[leader].self_attn, role).weight
                + getattr(base.model.layers[leader + 1].self_attn, role).weight
            ) / 2
            assert torch.allclose(getattr(layers[leader].self_attn, f"{role}_swiftkv").weight, mean)
        assert not hasattr(layers[leader + 1].self_attn, "k_proj_swiftkv")
    cache, base_cache = DynamicCache(config=model.config), DynamicCache(config=base.config)
    tokens = ids(length=10)
    with torch.no_grad():
        model(tokens, cache=cache, use_cache=True)
        base(tokens, cache=base_cache, use_cache=True)
    filled = [
        i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None and layer.keys.numel()
    ]
    assert filled == [0, 1, 2, 4]
    assert len(filled) == kv_cache_layers(6, 2, 2)
    assert kv_cache_bytes(cache) == pytest.approx(kv_cache_bytes(base_cache) * (1 - kv_cache_reduction(6, 2, 2)))


# ----------------------------------------------------------------------------------------------
# The skipping prefill and the cache


@pytest.mark.parametrize("group", [1, 2])
def test_prefill_skipping_is_exact_and_decode_continues_from_its_cache(group):
    base = sensitive_base()
    model = swiftkv_of(base, 2, group=group, init=False)
    tokens = ids(length=16)
    full = logits(model, tokens)  # every token through every layer (what perplexity needs)
    cache = DynamicCache(config=model.config)
    last = logits(model, tokens[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)  # upper layers on one token
    assert last.shape[1] == 1
    assert (last[:, 0] - full[:, -2]).abs().max() < 1e-5
    step = logits(model, tokens[:, -1:], cache=cache, use_cache=True, logits_to_keep=1)  # decode with the cache
    assert (step[:, 0] - full[:, -1]).abs().max() < 1e-5


def test_chunked_prefill_equals_one_prefill():
    model = swiftkv_of(sensitive_base(), 2, group=2, init=False)
    tokens = ids(length=14)
    one, two = DynamicCache(config=model.config), DynamicCache(config=model.config)
    whole = logits(model, tokens, cache=one, use_cache=True, logits_to_keep=1)
    logits(model, tokens[:, :9], cache=two, use_cache=True, logits_to_keep=1)
    chunked = logits(model, tokens[:, 9:], cache=two, use_cache=True, logits_to_keep=1)
    assert (whole - chunked).abs().max() < 1e-5
    for a, b in zip(one.layers, two.layers):
        if getattr(a, "keys", None) is not None:
            assert (a.keys - b.keys).abs().max() < 1e-5 and (a.values - b.values).abs().max() < 1e-5


def test_generation_with_the_cache_gives_the_tokens_of_generation_without_it():
    model = swiftkv_of(sensitive_base(), 2, group=2, init=False)
    prompt = ids(batch=1, length=10)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_matches_each_prompt_alone():
    model = swiftkv_of(sensitive_base(), 2, init=False)
    short, long = ids(batch=1, length=6, seed=3), ids(batch=1, length=9, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat(
        [
            torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1),
            torch.ones(1, 9, dtype=torch.long),
        ]
    )
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    together = logits(model, batch, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    assert (together[0, -1] - logits(model, short)[0, -1]).abs().max() < 1e-4
    assert (together[1, -1] - logits(model, long)[0, -1]).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# The block-by-block path the step trains through


def carried(swiftkv_model, base):
    """``base`` with its upper blocks turned into ``SwiftKVCarryLayer``s holding ``swiftkv_model``'s weights."""
    model = copy.deepcopy(base)
    config = swiftkv_model.config
    norm = copy.deepcopy(swiftkv_model.model.norm_swiftkv)
    model.model.norm_swiftkv = norm
    for index in range(config.num_key_value_layers, config.num_hidden_layers):
        model.model.layers[index] = SwiftKVCarryLayer(
            copy.deepcopy(swiftkv_model.model.layers[index]), config, index, norm
        )
    return model


@pytest.mark.parametrize("group", [1, 2])
def test_block_by_block_forward_and_gradients_equal_the_model_level_ones(group):
    base = sensitive_base(layers=6)
    reference = swiftkv_of(base, 2, group=group, init=False)
    model = carried(reference, base)
    handle = types.SimpleNamespace(
        adapter=adapter_for(base.config), base_model=model.model, model=model, blocks=model.model.layers
    )
    runner = BlockwiseModel(handle, "cpu")
    tokens = ids(length=10)
    assert (runner.logits(tokens) - logits(reference, tokens)).abs().max() < 1e-5

    def trainable(m):
        return {n: p for n, p in m.named_parameters() if "swiftkv" in n}

    for m in (reference, model):
        for p in trainable(m).values():
            p.requires_grad_(True)
    loss_fn = lambda out, _: out.pow(2).mean()  # noqa: E731
    runner.forward_backward(tokens, loss_fn)
    loss_fn(reference(tokens).logits, tokens).backward()
    grads = {n: p.grad for n, p in trainable(model).items()}
    assert set(grads) == set(trainable(reference))
    for name, p in trainable(reference).items():
        assert p.grad is not None and grads[name] is not None, name
        assert torch.allclose(grads[name], p.grad, atol=1e-5, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------
# The step: export, load, distillation, composition, errors


def swiftkv_recipe(calibration, **settings):
    settings = {"epochs": 2, "lr": 3e-3, "batch_size": 2, **settings}
    return Recipe.from_dict(
        {
            "calibration": {"dataset": calibration, "samples": 10, "seq_len": 32, "seed": 0},
            "steps": [{"swiftkv": settings}],
        }
    )


@pytest.fixture(scope="module")
def demo_swiftkv(tmp_path_factory):
    """The demo model (6 layers) with G = 2, so M = 4 (the default N // 2 = 3 raised to leave whole groups),
    briefly distilled."""
    from compressor.demo import demo_text_path

    out = tmp_path_factory.mktemp("swiftkv") / "demo"
    recipe = swiftkv_recipe(str(demo_text_path("calibration")), key_value_group_size=2, epochs=3, lr=2e-3)
    recipe.calibration.samples, recipe.calibration.seq_len = 8, 64
    report = apply(recipe, "demo", out, progress=False)
    return out, report


def test_export_has_the_released_layout_and_loads_three_ways(demo_swiftkv):
    from compressor.demo import demo_model_dir

    out, _ = demo_swiftkv
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_swiftkv" and config["architectures"] == ["LlamaSwiftKVForCausalLM"]
    assert (config["num_key_value_layers"], config["key_value_group_size"]) == (4, 2)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_swiftkv.LlamaSwiftKVForCausalLM"
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        with safe_open(demo_model_dir() / "model.safetensors", "pt") as g:
            assert all(torch.equal(f.get_tensor(n), g.get_tensor(n)) for n in g.keys())  # base weights kept, unchanged
    assert {n for n in names if "swiftkv" in n} == {
        "model.norm_swiftkv.weight",
        *(f"model.layers.{layer}.self_attn.q_proj_swiftkv.weight" for layer in (4, 5)),
        *(f"model.layers.4.self_attn.{r}_proj_swiftkv.weight" for r in "kv"),
    }
    tokens = ids(length=24, vocab=4096)
    ours = logits(load_quantized_model(out), tokens)  # our loader, no remote code
    plain = logits(
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens
    )  # registered by import compressor
    assert torch.allclose(ours, plain, atol=1e-5)
    script = (
        "import sys, torch; assert 'compressor' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        "assert 'compressor' not in sys.modules and type(m).__name__ == 'LlamaSwiftKVForCausalLM'\n"
        f"torch.save(m(torch.tensor({tokens.tolist()})).logits, sys.argv[1])\n"
    )
    saved = out.parent / "remote.pt"
    subprocess.run([sys.executable, "-c", script, str(saved)], check=True, cwd=out.parent)
    assert torch.allclose(torch.load(saved), plain, atol=1e-5)


def test_check_says_which_engines_serve_swiftkv_exports(demo_swiftkv):
    from compressor.serving import check_checkpoint, verdicts

    out, _ = demo_swiftkv
    by_engine = {v.engine: v for v in check_checkpoint(out) if "SwiftKV" in v.part}
    assert by_engine["transformers"].loads
    assert not by_engine["vllm"].loads and "key_value_group_size 1" in by_engine["vllm"].how  # AcrossKV: not the plugin
    single = {
        v.engine: v.loads
        for v in verdicts({"model_type": "llama_swiftkv", "num_key_value_layers": 3, "key_value_group_size": 1})
    }
    assert single == {"vllm": True, "transformers": True}
    assert not any(
        v.loads for v in verdicts({"model_type": "qwen2_swiftkv", "key_value_group_size": 1}) if v.engine == "vllm"
    )


def test_distillation_lowers_the_heldout_kl_and_trains_only_the_new_tensors(demo_swiftkv):
    _, report = demo_swiftkv
    row = next(r for r in report.rows if r["step"] == "swiftkv")
    assert row["kv_cache_layers"] == 4 + 1 and row["kv_cache_reduction"] == pytest.approx(2 / 6 * (1 - 1 / 2), abs=1e-6)
    before, after = row["heldout_curve"][0], min(row["heldout_curve"])
    assert before > 1e-3 and after < 0.7 * before
    # the leader's q, k, v (256 -> 256, 64, 64), the follower's q, and the norm
    assert row["trained_parameters"] == 256 * (256 + 2 * 64) + 256 * 256 + 256


def test_swiftkv_then_rtn_quantizes_the_new_projections_and_loads(tmp_path, calibration_file, tiny_models):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32, "seed": 0},
            "steps": [{"swiftkv": {"epochs": 1, "batch_size": 2}}, {"rtn": {"bits": 8, "group_size": 32}}],
        }
    )
    apply(recipe, tiny_models["qwen2"], tmp_path / "out", progress=False)
    model = load_quantized_model(tmp_path / "out")
    attention = model.model.layers[1].self_attn
    assert type(model).__name__ == "Qwen2SwiftKVForCausalLM"
    assert all(
        isinstance(getattr(attention, n), QuantizedLinear)
        for n in ("q_proj_swiftkv", "k_proj_swiftkv", "v_proj_swiftkv")
    )
    assert attention.q_proj_swiftkv.bias is not None
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32
    )  # dequantized by transformers
    tokens = ids(length=16)
    assert torch.isfinite(logits(model, tokens)).all()
    assert (logits(model, tokens) - logits(reference, tokens)).abs().max() < 1e-3


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"num_key_value_layers": 3}, "num_key_value_layers"),  # tiny models have 2 layers
        ({"num_key_value_layers": 0}, "num_key_value_layers"),
        ({"num_key_value_layers": 1, "key_value_group_size": 2}, "key_value_group_size"),
    ],
)
def test_bad_layer_counts_stop_with_one_line_errors_before_any_work(
    tmp_path, calibration_file, tiny_llama, settings, key
):
    with pytest.raises(Exception) as caught:
        recipe = swiftkv_recipe(calibration_file, **settings)
        apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert isinstance(caught.value, StepError) or "RecipeError" in type(caught.value).__name__
    assert key in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_family_is_refused(tmp_path, calibration_file, tiny_models):
    from compressor.errors import UserError

    with pytest.raises(UserError, match="steps\\[0\\].swiftkv: assumes the block of llama, qwen2; qwen3 is not one"):
        apply(swiftkv_recipe(calibration_file), tiny_models["qwen3"], tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "first_import",
    [
        "from compressor.lowrank.swiftkv import SwiftKV",
        "from compressor.arch.swiftkv.modeling_llama_swiftkv import LlamaSwiftKVForCausalLM",
        "import transformers; from compressor import apply",
        "from transformers import AutoModelForCausalLM; import compressor",
    ],
)
def test_swiftkv_models_register_whatever_is_imported_first(first_import):
    """The registration waits for our own half-imported modeling module too (it imports the
    transformers table whose import triggers the registration)."""
    script = (
        f"{first_import}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.for_model('llama_swiftkv')\n"
        "assert type(config).__name__ == 'LlamaSwiftKVConfig', config\n"
        "assert AutoModelForCausalLM._model_mapping[type(config)].__name__ == 'LlamaSwiftKVForCausalLM'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
