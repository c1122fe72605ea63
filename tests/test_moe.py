"""Mixture-of-experts families (compressor/moe.py): per-expert linears, routed calibration, exports that
transformers loads under the checkpoint's own expert names."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compressor.api import apply
from compressor.errors import UserError
from compressor.export import load_quantized_model
from compressor.model import ModelHandle
from compressor.modules.linear import QuantizedLinear
from compressor.moe import RoutedExperts
from compressor.recipe import Recipe
from compressor.testing import MOE_ARCHITECTURES, make_random_model

FAMILIES = list(MOE_ARCHITECTURES)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_random_model(arch, root / arch) for arch in FAMILIES}


def tokens(seed=0):
    return torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(seed))


def stored_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def expert_linear_count(config, arch) -> int:
    """Linears the recipe must quantize: attention, every expert's three, shared experts', dense MLPs'."""
    layers = config["num_hidden_layers"]
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    attention = 4
    dense = config.get("first_k_dense_replace", 0)
    shared = 3 if arch in ("qwen2_moe", "deepseek_v3") else 0
    return layers * attention + (layers - dense) * (3 * experts + shared) + dense * 3


@pytest.mark.parametrize("arch", FAMILIES)
def test_per_expert_model_runs_as_transformers_fused_one(moe_models, arch):
    """The handle's model (experts unfused into per-expert linears, read under the checkpoint's names, the
    routing bias buffer loaded) gives transformers' logits exactly."""
    handle = ModelHandle.open(moe_models[arch])
    model = handle.materialize_all("cpu", torch.float32)
    assert any(isinstance(m, RoutedExperts) for m in model.modules())
    assert not any(p.dim() == 3 for p in model.parameters())  # no fused expert tensor anywhere
    reference = AutoModelForCausalLM.from_pretrained(moe_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        # the same arithmetic in another order (per-expert linears vs fused 3-D matmuls; threads split sums):
        # equal to float rounding
        assert torch.allclose(model(tokens()).logits, reference(tokens()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_rtn_export_loads_in_transformers_every_expert_quantized_router_untouched(moe_models, arch, tmp_path):
    recipe = Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 32}}]})
    apply(recipe, moe_models[arch], tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    ours = load_quantized_model(tmp_path / "out")
    quantized = [name for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == expert_linear_count(config, arch)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()).logits, theirs(tokens()).logits, rtol=1e-5, atol=1e-5)
    # the checkpoint's own names: per-expert tensors (Mixtral's block_sparse_moe.experts.e.w1), routers bit-equal
    original, exported = stored_tensors(moe_models[arch]), stored_tensors(tmp_path / "out")
    routers = [n for n in original if n.endswith(("gate.weight", "shared_expert_gate.weight", "correction_bias"))]
    routers = [n for n in routers if ".experts." not in n and "gate_proj" not in n]
    assert routers and all(torch.equal(original[n], exported[n]) for n in routers)
    expert_weights = [n for n in original if ".experts." in n]
    assert expert_weights and all(n.replace(".weight", ".weight_packed") in exported for n in expert_weights)


def test_starved_experts_are_named_and_tokens_reported(moe_models, calibration_file, tmp_path):
    """Few calibration tokens: the report lists the tokens routed to each expert of each MoE layer (they add
    up to top-k per token), and every expert below the threshold is named in a warning."""
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 16, "min_expert_tokens": 20},
            "steps": [{"gptq": {"bits": 4, "group_size": 32}}],
        }
    )
    report = apply(recipe, moe_models["qwen3_moe"], tmp_path / "out", progress=False)
    census = [row for row in report.rows if "tokens_per_expert" in row]
    assert [row["module"] for row in census] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(sum(row["tokens_per_expert"]) == 2 * 16 * 2 for row in census)
    named = 0
    for row in census:
        starved = [str(i) for i, n in enumerate(row["tokens_per_expert"]) if n < 20]
        warned = [w for w in report.warnings if w.startswith(f"{row['module']}: ")]
        expected = f"{row['module']}: experts {', '.join(starved)} received fewer than 20 calibration tokens"
        assert [w.startswith(expected) for w in warned] == ([True] if starved else [])
        named += len(starved)
    assert named  # 64 routed tokens over 4 experts and a threshold of 20: some expert is below it


def test_all_policy_shows_every_token_to_every_expert_without_changing_outputs(moe_models):
    from compressor.moe import calibrating

    handle = ModelHandle.open(moe_models["mixtral"])
    handle.materialize_all("cpu", torch.float32)
    block = handle.blocks[0]
    experts = block.get_submodule("mlp.experts")
    seen = []
    hooks = [e.w1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0])) for e in experts]
    x = torch.randn(1, 9, 128)
    position = handle.model.model.rotary_emb(x, torch.arange(9)[None])
    with torch.no_grad():
        routed = block(x, position_embeddings=position)
        routed_seen = list(seen)
        seen.clear()
        with calibrating(handle.adapter, block, "all") as counts:
            everything = block(x, position_embeddings=position)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(routed, everything, atol=1e-6)
    assert seen == [9] * 4 and sum(routed_seen) == 9 * 2 and counts.sum() == 9 * 2


@pytest.mark.parametrize("step", [{"swiftkv": {}}, {"transmla": {}}])
def test_structural_methods_refuse_moe_before_any_work(moe_models, step, tmp_path):
    recipe = Recipe.from_dict({"steps": [step]})
    with pytest.raises(UserError, match="is not one of them \\(mixture-of-experts MLPs"):
        apply(recipe, moe_models["qwen2_moe"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def calibrated(calibration_file, *steps):
    return Recipe.from_dict(
        {"calibration": {"dataset": calibration_file, "samples": 8, "seq_len": 32}, "steps": list(steps)}
    )


def loads_alike(folder, expected_quantized):
    """Our loader and plain transformers (after ``import compressor``) give the same logits, with
    ``expected_quantized`` quantized linears."""
    ours = load_quantized_model(folder)
    assert sum(isinstance(m, QuantizedLinear) for m in ours.modules()) == expected_quantized
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens(3)).logits, theirs(tokens(3)).logits, rtol=1e-5, atol=1e-5)
    return ours


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_efficientqat_block_ap_and_e2e_qp_on_experts_export_and_load(moe_models, arch, calibration_file, tmp_path):
    """Block-AP trains every expert's scales inside its block and E2E-QP every scale end to end; the export
    loads in transformers as the in-memory model runs, and no expert linear is left dense."""
    recipe = calibrated(
        calibration_file,
        {"efficientqat_block_ap": {"bits": 2, "group_size": 32, "epochs": 2, "symmetric": True}},
        {"efficientqat_e2e_qp": {"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4}},
    )
    report = apply(recipe, moe_models[arch], tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    loads_alike(tmp_path / "out", expert_linear_count(config, arch))
    trained = [r for r in report.rows if r["step"] == "efficientqat_block_ap" and ".experts." in r["module"]]
    experts = config.get("num_local_experts") or config.get("n_routed_experts")
    moe_layers = config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    assert len(trained) == 3 * experts * moe_layers


def test_squeezellm_on_experts_writes_the_native_format_with_the_checkpoint_names(
    moe_models, calibration_file, tmp_path
):
    """Per-expert Fisher (gradients reach each expert's own linears) and codebooks; Mixtral's experts keep
    their ``block_sparse_moe.experts.e.w1`` names in our native format too."""
    apply(
        calibrated(calibration_file, {"squeezellm": {"bits": 3}}),
        moe_models["mixtral"],
        tmp_path / "out",
        progress=False,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "compressor_mixtral"
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in config["quantization_config"]["modules"]
    loads_alike(tmp_path / "out", expert_linear_count(config, "mixtral"))


def test_qllm_corrects_experts(moe_models, calibration_file, tmp_path):
    recipe = calibrated(
        calibration_file,
        {"qllm": {"bits": 4, "group_size": 32, "symmetric": True, "weight_only": True, "epochs": 1}},
    )
    apply(recipe, moe_models["qwen2_moe"], tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    loads_alike(tmp_path / "out", expert_linear_count(config, "qwen2_moe"))


def test_check_says_which_expert_schemes_vllm_fused_moe_takes():
    from compressor.serving import verdicts

    def config(bits, group_size, width=128, groups=1):
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
        targets = ["Linear"] if groups == 1 else None
        config_groups = {
            f"group_{i}": {
                "targets": targets or [f"re:^model.layers.0.mlp.experts.{i}.gate_proj$"],
                "weights": {**weights, "num_bits": bits + i},
            }
            for i in range(groups)
        }
        return {
            "model_type": "qwen3_moe",
            "hidden_size": 128,
            "moe_intermediate_size": width,
            "num_experts": 4,
            "quantization_config": {"quant_method": "compressed-tensors", "config_groups": config_groups},
        }

    def expert_verdict(cfg):
        return next(v for v in verdicts(cfg, ("vllm",)) if v.part.startswith("routed experts"))

    assert expert_verdict(config(4, 128)).loads and not expert_verdict(config(4, 128)).caveats
    assert not expert_verdict(config(3, 64)).loads  # fused MoE kernels: 4 or 8 bits
    assert expert_verdict(config(4, 128, width=96)).caveats  # Marlin MoE: width a multiple of the group
    assert (
        "same" in expert_verdict(config(4, 32, groups=2)).how
        or "one scheme" in expert_verdict(config(4, 32, groups=2)).how
    )


def test_experts_with_mixed_schemes_are_named_for_vllm(moe_models, tmp_path):
    recipe = Recipe.from_dict(
        {
            "steps": [
                {"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "re:layers\\.1\\.mlp\\.experts\\.2\\.w1"]}}
            ]
        }
    )
    report = apply(recipe, moe_models["mixtral"], tmp_path / "out", progress=False)
    mixed = [w for w in report.warnings if "different quantization schemes" in w]
    assert [w.split(":")[0] for w in mixed] == ["model.layers.1.mlp.experts"]


def test_demo_moe_ships_beside_the_demo_with_its_tokenizer():
    from compressor.demo import demo_model_dir
    from compressor.model import resolve_model_path

    path = resolve_model_path("demo-moe")
    handle = ModelHandle.open("demo-moe")
    assert handle.config.model_type == "mixtral" and handle.adapter.experts is not None
    assert sum(f.stat().st_size for f in path.iterdir()) <= 15 * 2**20
    assert (path / "tokenizer.json").read_bytes() == (demo_model_dir() / "tokenizer.json").read_bytes()


def test_a_model_step_alone_reports_tokens_per_expert_too(moe_models, calibration_file, tmp_path):
    recipe = calibrated(calibration_file, {"squeezellm": {"bits": 4}})
    report = apply(recipe, moe_models["qwen3_moe"], tmp_path / "out", progress=False)
    census = [row for row in report.rows if "tokens_per_expert" in row]
    assert [row["module"] for row in census] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(sum(row["tokens_per_expert"]) == 8 * 32 * 2 for row in census)


def test_all_policy_gives_every_expert_statistics_even_when_starved(moe_models, calibration_file, tmp_path):
    """GPTQ on 4 calibration tokens: routed, some expert of DeepSeek's 8 gets none and is rounded to nearest
    (a warning); with ``expert_calibration: all`` every expert has a Hessian from all 4 tokens."""

    def run(policy, folder):
        recipe = Recipe.from_dict(
            {
                "calibration": {"dataset": calibration_file, "samples": 1, "seq_len": 8, "expert_calibration": policy},
                "steps": [{"gptq": {"bits": 4, "group_size": 32}}],
            }
        )
        return apply(recipe, moe_models["deepseek_v3"], tmp_path / folder, progress=False)

    uncalibrated = "saw no calibration token"
    routed = run("routed", "routed")
    assert any(uncalibrated in w and ".experts." in w for w in routed.warnings)
    everything = run("all", "all")
    assert not any(uncalibrated in w for w in everything.warnings)
    assert any("received fewer than 16 calibration tokens" in w for w in everything.warnings)  # the census is routed


# --- checkpoints that store the experts fused (transformers 5's layout on disk) --------------------------------


@pytest.fixture(scope="module")
def fused_models(tmp_path_factory):
    """The same random models (same seed, same weights) written with transformers 5's fused expert tensors."""
    root = tmp_path_factory.mktemp("fused")
    return {arch: make_random_model(arch, root / arch, fused_experts=True) for arch in FAMILIES}


@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_checkpoint_reads_each_expert_as_its_slice(moe_models, fused_models, arch):
    """Each expert's linears are read as their slice of the fused tensor: the model equals the one read from the
    per-expert checkpoint of the same weights, tensor for tensor (benchmarks/memory.py --fused: no second copy)."""
    fused, per_expert = ModelHandle.open(fused_models[arch]), ModelHandle.open(moe_models[arch])
    assert fused.fused_experts and not per_expert.fused_experts
    assert any(name.endswith("experts.gate_up_proj") for name in fused.tensor_files)
    prefix = fused.block_prefix(1)
    names = [f"{prefix}.{name}" for name, _ in fused.blocks[1].named_parameters()]
    ours, theirs = fused.read_tensors(names), per_expert.read_tensors(names)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in names)
    model = fused.materialize_all("cpu", torch.float32)
    reference = per_expert.materialize_all("cpu", torch.float32)
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference(tokens()).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_checkpoint_exports_per_expert_names_and_dense_exports_fused(moe_models, fused_models, arch, tmp_path):
    """RTN from the fused checkpoint writes exactly the tensors it writes from the per-expert one (per-expert names:
    what vLLM's fused-MoE loader and transformers' compressed-tensors loader read), which load with equal logits;
    a dense export writes the fused tensors again under the input's names, and transformers reads it as the
    quantized model runs."""
    rtn = {"rtn": {"bits": 4, "group_size": 32}}
    apply(Recipe.from_dict({"steps": [rtn]}), fused_models[arch], tmp_path / "fused", progress=False)
    apply(Recipe.from_dict({"steps": [rtn]}), moe_models[arch], tmp_path / "per_expert", progress=False)
    ours, theirs = stored_tensors(tmp_path / "fused"), stored_tensors(tmp_path / "per_expert")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    quantized = loads_alike(tmp_path / "fused", expert_linear_count(config, arch))

    recipe = Recipe.from_dict({"steps": [rtn], "export": {"format": "dense"}})
    apply(recipe, fused_models[arch], tmp_path / "dense", progress=False)
    dense, original = stored_tensors(tmp_path / "dense"), stored_tensors(fused_models[arch])
    assert dense.keys() == original.keys()
    assert all(dense[n].shape == original[n].shape for n in dense)
    gate_up = next(n for n in dense if n.endswith("layers.1.mlp.experts.gate_up_proj"))
    expert = quantized.get_submodule(gate_up.replace("gate_up_proj", "2")).projections()
    halves = dense[gate_up][2].chunk(2)
    for half, linear in zip(halves, expert[:2]):
        assert torch.equal(half, linear.stored_weight.dequantize(torch.float32))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens(3)).logits, quantized(tokens(3)).logits, rtol=1e-5, atol=1e-5)


def test_routers_are_quantized_only_when_the_recipe_says_so(moe_models, tiny_llama, tmp_path):
    """``quantize_routers`` rounds every router (Qwen2-MoE's shared_expert_gate too) onto its grid, stored in the
    checkpoint's dtype, which transformers loads as our loader does; quantizers alone leave routers bit-equal
    (test_rtn_export_...); a dense model is refused in one line before any work."""
    from compressor.quant.uniform import quantize_uniform

    recipe = Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 32}}, {"quantize_routers": {"bits": 4}}]})
    report = apply(recipe, moe_models["qwen2_moe"], tmp_path / "out", progress=False)
    original, exported = stored_tensors(moe_models["qwen2_moe"]), stored_tensors(tmp_path / "out")
    routers = [n for n in original if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert len(routers) == 2 * 2
    for name in routers:
        expected = quantize_uniform(original[name], 4, -1, True, torch.float32).dequantize(torch.float32)
        assert torch.equal(exported[name], expected) and not torch.equal(exported[name], original[name])
        assert all(len(row.unique()) <= 2**4 for row in exported[name])
    assert len([r for r in report.rows if r["step"] == "quantize_routers"]) == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    loads_alike(tmp_path / "out", expert_linear_count(config, "qwen2_moe"))
    with pytest.raises(UserError, match="steps\\[0\\].quantize_routers: assumes the block of mixtral, qwen2_moe"):
        apply(Recipe.from_dict({"steps": [{"quantize_routers": {}}]}), tiny_llama, tmp_path / "dense", progress=False)
    assert not (tmp_path / "dense").exists()


def test_quantizing_a_block_of_experts_trims_the_heap_as_it_goes(moe_models, monkeypatch, tmp_path):
    """The heap is handed back every TRIM_EVERY bytes of replaced weights inside a block, not only when the block
    is released: hundreds of small expert linears otherwise leave their temporaries' holes resident
    (benchmarks/memory.py --experts 64: a block held 3-5x its codes)."""
    import compressor.context
    import compressor.model

    trims = []
    monkeypatch.setattr(compressor.context, "TRIM_EVERY", 64 * 2**10)
    monkeypatch.setattr(compressor.context, "return_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(compressor.model, "return_freed_memory", lambda: None)  # releases of blocks: not counted
    apply(Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 32}}]}), moe_models["mixtral"], tmp_path / "o")
    # per block, in fp32: 4 experts x 3 linears of 128 x 128 (64 KiB each: a trim after each), then attention's q
    # (64 KiB: a trim), k and v (32 KiB each: one trim after v) and o (64 KiB: a trim)
    assert len(trims) == 2 * (12 + 3)


def test_calibrated_gptq_from_a_fused_checkpoint_equals_it_from_per_expert_tensors(
    moe_models, fused_models, calibration_file, tmp_path
):
    """A calibrated pass (blocks in fp32, routed Hessians per expert, shared experts and a dense first layer) reads
    the fused slices as it reads per-expert tensors: the two exports are the same, tensor for tensor."""
    recipe = calibrated(calibration_file, {"gptq": {"bits": 4, "group_size": 32}})
    apply(recipe, fused_models["deepseek_v3"], tmp_path / "fused", progress=False)
    apply(recipe, moe_models["deepseek_v3"], tmp_path / "per_expert", progress=False)
    ours, theirs = stored_tensors(tmp_path / "fused"), stored_tensors(tmp_path / "per_expert")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


# MoDeGPT per expert (Type I on each expert's routed tokens; masked export)

CALIBRATION = {"dataset": "demo", "samples": 16, "seq_len": 128, "seed": 0}


def modegpt_on(calibration_file, samples=8, **settings):
    return Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": samples, "seq_len": 32},
            "steps": [{"modegpt": {"export": "masked", **settings}}],
        }
    )


@pytest.mark.parametrize("arch", FAMILIES)
def test_modegpt_on_experts_is_exact_at_full_width_and_its_masked_export_loads_alike(
    moe_models, arch, calibration_file, tmp_path
):
    """Ratio 0: every expert, shared expert and dense MLP goes through the Nystrom refit keeping every neuron, which
    is exact. Ratio 0.3: stock transformers loads the masked export (stock shapes) with our loader's logits."""
    original = AutoModelForCausalLM.from_pretrained(moe_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = original(tokens(3)).logits
    if arch in ("mixtral", "deepseek_v3"):
        apply(modegpt_on(calibration_file, ratio=0.0), moe_models[arch], tmp_path / "zero", progress=False)
        whole = AutoModelForCausalLM.from_pretrained(tmp_path / "zero", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(whole(tokens(3)).logits, expected, rtol=0, atol=1e-5)
    report = apply(modegpt_on(calibration_file, ratio=0.3), moe_models[arch], tmp_path / "out", progress=False)
    (total,) = [row for row in report.rows if row["module"].endswith(".blocks")]
    assert abs(total["removed"] - 0.3) < 0.02
    compressed = loads_alike(tmp_path / "out", expected_quantized=0)
    with torch.no_grad():
        assert (compressed(tokens(3)).logits - expected).abs().max() > 1e-3  # neurons went
    stored = stored_tensors(tmp_path / "out")
    gates = {n: t for n, t in stored.items() if ".experts." in n and n.endswith((".w1.weight", ".gate_proj.weight"))}
    assert gates and all(bool((t == 0).all(dim=-1).any()) for t in gates.values())  # dropped neurons: zero rows


def test_modegpt_plan_counts_experts_shared_experts_and_dense_layers(moe_models, calibration_file, tmp_path):
    report = apply(modegpt_on(calibration_file, ratio=0.2), moe_models["deepseek_v3"], tmp_path / "out", progress=False)
    (total,) = [row for row in report.rows if row["module"].endswith(".blocks")]
    config = MOE_ARCHITECTURES["deepseek_v3"]  # 2 layers: the first dense, the second 8 routed + 1 shared
    assert (total["moe_layers"], total["dense_layers"]) == (1, 1)
    assert (total["experts"], total["shared_experts"]) == (config["n_routed_experts"], 1)
    blocks = [row for row in report.rows if row["module"].endswith(".block")]
    assert [row["mlps"] for row in blocks] == [1, config["n_routed_experts"] + 1]
    assert "attention left whole" in total["note"]


def test_modegpt_at_half_width_beats_dropping_the_same_neurons_per_expert():
    """demo-moe (trained): half of every expert's neurons, chosen by ridge leverage on the expert's routed
    calibration tokens; the refit of ``down`` gives a lower KL from the original model on held-out text than
    dropping the same neurons (the probe, benchmarks/results/moe/modegpt-experts-probe.md: 29x at 32 x 512)."""
    import copy

    from transformers import AutoTokenizer

    from compressor.calibration import calibration_tokens
    from compressor.eval import heldout_stream, make_windows
    from compressor.lowrank.modegpt import down_correlations, mask_neurons, mlp_units, nystrom_mlp

    handle = ModelHandle.open("demo-moe")
    model = handle.materialize_all("cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(handle.path)
    blocks = model.get_submodule(handle.adapter.blocks)
    units = {(i, p): linears for i, b in enumerate(blocks) for p, (_, linears) in mlp_units(handle.adapter, b).items()}
    calibration = calibration_tokens(
        tokenizer, Recipe.from_dict({"calibration": CALIBRATION, "steps": [{"rtn": {}}]}).calibration
    )
    with torch.no_grad(), down_correlations({key: linears[2] for key, linears in units.items()}) as stats:
        for batch in calibration.split(8):
            model(batch)
    heldout = make_windows(heldout_stream(tokenizer, "demo"), 128, 4)
    with torch.no_grad():
        p = model(heldout).logits.log_softmax(-1)

    def kl(refit: bool) -> float:
        compressed = copy.deepcopy(model)
        blocks = compressed.get_submodule(handle.adapter.blocks)
        for i, path in units:
            linears = mlp_units(handle.adapter, blocks[i])[path][1]
            width = linears[0].out_features
            gate, up, down, index = nystrom_mlp(*(linear.weight for linear in linears), stats[(i, path)], width // 2)
            mask_neurons(linears, gate, up, down if refit else linears[2].weight[:, index], index)
        with torch.no_grad():
            q = compressed(heldout).logits.log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert all(key in stats for key in units)  # every expert was routed calibration tokens
    ours, dropped = kl(refit=True), kl(refit=False)
    assert ours < 0.25 * dropped, (ours, dropped)


def test_modegpt_names_experts_no_token_reached_and_leaves_them_whole(moe_models, calibration_file, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 1, "seq_len": 8},
            "steps": [{"modegpt": {"export": "masked", "ratio": 0.2}}],
        }
    )
    report = apply(recipe, moe_models["deepseek_v3"], tmp_path / "out", progress=False)
    (census,) = [row["tokens_per_expert"] for row in report.rows if "tokens_per_expert" in row]
    unseen = [f"mlp.experts.{e}" for e, n in enumerate(census) if n == 0]
    assert unseen  # 8 tokens, top-2 of 8 experts
    (warning,) = [w for w in report.warnings if "modegpt left" in w]
    assert warning == (
        f"model.layers.1: modegpt left {', '.join(unseen)} whole: no calibration token reached them "
        "(use more calibration samples, or calibration.expert_calibration: all)"
    )
    (block,) = [row for row in report.rows if row["module"] == "model.layers.1.block"]
    assert block["left_whole"] == len(unseen)
    recipe.calibration.expert_calibration = "all"  # every expert sees every token, for statistics
    report = apply(recipe, moe_models["deepseek_v3"], tmp_path / "all", progress=False)
    assert not [w for w in report.warnings if "modegpt left" in w]
    assert [row["left_whole"] for row in report.rows if row["module"].endswith(".block")] == [0, 0]


@pytest.mark.parametrize(
    "settings, message",
    [({"export": "sliced"}, "moe_intermediate_size"), ({"modules": ["vo"]}, "steps[0].modegpt.modules: ['vo'] leaves")],
)
def test_modegpt_sliced_export_of_a_moe_is_refused_in_one_line(
    moe_models, calibration_file, settings, message, tmp_path
):
    with pytest.raises(UserError) as error:
        apply(modegpt_on(calibration_file, **settings), moe_models["qwen3_moe"], tmp_path / "out", progress=False)
    assert "steps[0].modegpt" in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_modegpt_then_rtn_on_experts_exports_compressed_tensors_that_load_alike(moe_models, calibration_file, tmp_path):
    """The masked experts keep stock shapes, so a quantizer after modegpt quantizes every expert linear and the
    compressed-tensors export loads in transformers with our loader's logits."""
    recipe = calibrated(
        calibration_file, {"modegpt": {"export": "masked", "ratio": 0.3}}, {"rtn": {"bits": 4, "group_size": 32}}
    )
    apply(recipe, moe_models["qwen2_moe"], tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    loads_alike(tmp_path / "out", expert_linear_count(config, "qwen2_moe"))
