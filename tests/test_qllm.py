"""QLLM: the reassembly identities (shared/methods/qllm.md section 7), its exactness on every
architecture, the quality properties on planted outliers, error correction, the activation quantizer,
bad keys, and export round trips (native W+A and compressed-tensors weight-only)."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import Recipe, apply
from compressor.export import load_quantized_model
from compressor.model import ModelHandle
from compressor.modules.activations import ActivationSpec, fake_quantize_tokens
from compressor.pipeline import Session
from compressor.quant import qllm
from compressor.quant.qllm import (
    QLLMLinear,
    channel_magnitudes,
    choose_merges,
    disassemble,
    fake_quantize_weight,
    merge_scores,
    reassemble,
    search_threshold,
    split_counts,
    threshold_candidates,
)
from compressor.quant.uniform import quantize_uniform
from compressor.recipe import RecipeError

TOKENS = 37


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Reassembly math (fp64)


@pytest.mark.parametrize("channels", [15, 16])
def test_disassembly_is_exact_and_bounds_every_channel(channels):
    x = torch.randn(TOKENS, channels, generator=gen(channels), dtype=torch.float64)
    x[:, 3] *= 40
    w = torch.randn(9, channels, generator=gen(1), dtype=torch.float64)
    counts = torch.randint(1, 6, (channels,), generator=gen(2))
    x_split, w_split = disassemble(x, w, counts)
    torch.testing.assert_close(x_split @ w_split.t(), x @ w.t(), rtol=1e-12, atol=1e-12)
    theta = 7.0
    counts = split_counts(channel_magnitudes(x), theta)
    x_split, _ = disassemble(x, w, counts)
    assert float(x_split.abs().amax()) <= theta + 1e-12
    assert int(counts[3]) > 1


def test_merging_equal_channels_is_exact_and_the_merge_error_formula_holds():
    x = torch.randn(TOKENS, 2, generator=gen(0), dtype=torch.float64)
    w = torch.randn(5, 2, generator=gen(1), dtype=torch.float64)
    merged = (w[:, 0] + w[:, 1])[:, None] * ((x[:, 0] + x[:, 1]) / 2)[None, :]  # W'' x'' for the pair
    error = (x @ w.t()).t() - merged
    expected = ((w[:, 0] - w[:, 1])[:, None] * (x[:, 0] - x[:, 1])[None, :]) / 2
    torch.testing.assert_close(error, expected, rtol=1e-12, atol=1e-12)
    x[:, 1] = x[:, 0]
    merged = (w[:, 0] + w[:, 1])[:, None] * ((x[:, 0] + x[:, 1]) / 2)[None, :]
    torch.testing.assert_close(merged, (x @ w.t()).t(), rtol=1e-12, atol=1e-12)


def literal_scores(x, w, movable):
    """The official double loop (reassembly/ca_module.py), all a-channels included, ported for the test."""
    a, b = list(range(0, x.shape[1], 2)), list(range(1, x.shape[1], 2))
    scores = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            d = torch.linalg.norm(x[:, ai] - x[:, bj])
            u, v = w[:, ai].sum(), w[:, bj].sum()
            scores[i, j] = math.inf if not (movable[ai] and movable[bj]) else float(((u + v) * d) ** 2)
    return scores


@pytest.mark.parametrize("channels", [15, 16])
def test_vectorised_scores_equal_the_official_double_loop(channels):
    x = torch.randn(TOKENS, channels, generator=gen(3), dtype=torch.float64)
    w = torch.randn(7, channels, generator=gen(4), dtype=torch.float64)
    movable = torch.ones(channels, dtype=torch.bool)
    movable[[2, 5]] = False
    torch.testing.assert_close(
        merge_scores(x, w, movable, "code").double(), literal_scores(x, w, movable), rtol=1e-5, atol=1e-6
    )
    paper = merge_scores(x, w, movable, "paper")
    i, j = 1, 2  # a-channel 2, b-channel 5 are masked; pair (a=2 -> index 1 of a) is masked, check an unmasked one
    i, j = 3, 3  # a = channel 6, b = channel 7
    exact = float(torch.linalg.norm(x[:, 6] - x[:, 7]) ** 2 * torch.linalg.norm(w[:, 6] - w[:, 7]) ** 2 / 4)
    assert paper[i, j].item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("channels", [15, 16])
def test_reassembly_keeps_the_width_never_merges_sub_channels_and_p_is_the_bookkeeping(channels):
    x = torch.randn(TOKENS, channels, generator=gen(5), dtype=torch.float64)
    x[:, 1] *= 30
    x[:, 8] *= 12
    weights = [
        torch.randn(6, channels, generator=gen(6), dtype=torch.float64),
        torch.randn(4, channels, generator=gen(7), dtype=torch.float64),
    ]
    m = channel_magnitudes(x)
    theta = max(float(m[1]) / 3, float(m[8]) / 2, float(m.sort().values[-3])) * 1.01  # splits the two outliers only
    plan = reassemble(x, weights, m, theta)
    assert plan.extra > 0
    p = plan.channel_map
    assert (p.channels, p.in_channels) == (channels, channels)
    assert p.nnz <= channels + plan.extra
    # the bookkeeping: disassemble, then merge the chosen pairs explicitly
    counts = split_counts(m, theta)
    owner = torch.repeat_interleave(torch.arange(channels), counts)
    x_split, w_split = disassemble(x, torch.cat(weights), counts)
    movable = counts[owner] == 1
    sources, destinations = choose_merges(merge_scores(x_split, w_split, movable), plan.extra)
    assert bool(movable[sources].all()) and bool(movable[destinations].all())  # sub-channels never merge
    keep = [k for k in range(len(owner)) if k not in set(sources.tolist())]
    members = {d: [d] for d in keep}
    for s, d in zip(sources.tolist(), destinations.tolist()):
        members[d].append(s)
    x_merged = torch.stack([x_split[:, members[k]].mean(1) for k in keep], 1)
    w_merged = torch.stack([w_split[:, members[k]].sum(1) for k in keep], 1)
    torch.testing.assert_close(p.apply(x.float()).double(), x_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(plan.weights).double(), w_merged, rtol=1e-6, atol=1e-6)
    assert float(p.apply(x.float()).abs().amax()) <= theta * (1 + 1e-6)  # every channel now bounded by theta


def test_duplicated_channels_are_matched_and_the_transform_is_then_lossless():
    channels = 16
    x = torch.randn(TOKENS, channels, generator=gen(8), dtype=torch.float64)
    x[:, 0] *= 25  # one outlier: split into several copies, so that many pairs must merge
    for i in (2, 4, 6, 8, 10):
        x[:, i + 1] = x[:, i]
    weights = [torch.randn(5, channels, generator=gen(9), dtype=torch.float64)]
    m = channel_magnitudes(x)
    theta = float(m[0]) / 3.5  # channel 0 -> 4 copies: A = 3 pairs to merge
    plan = reassemble(x, weights, m, theta)
    assert plan.extra == 3
    fresh = torch.randn(11, channels, generator=gen(10), dtype=torch.float64)
    for i in (2, 4, 6, 8, 10):
        fresh[:, i + 1] = fresh[:, i]
    # disassembly shifts the indices of channels after 0 by 3, so duplicates sit at (odd, even) pairs... any
    # zero-score pairs the matcher finds are exact; check the result rather than the indices
    out = (plan.channel_map.dense().double() @ fresh.t()).t() @ plan.weights[0].double().t()
    torch.testing.assert_close(out, fresh @ weights[0].t(), rtol=1e-6, atol=1e-6)


def test_threshold_search_is_monotone_within_budget_and_never_worse_than_none():
    x = torch.randn(64, 24, generator=gen(11))
    x[:, [3, 17]] *= 100
    w = torch.randn(32, 24, generator=gen(12))
    m = channel_magnitudes(x)
    candidates = threshold_candidates(m, budget=math.floor(0.2 * 24))
    thetas, extras = zip(*candidates)
    assert list(thetas) == sorted(thetas, reverse=True) and list(extras) == sorted(extras)
    assert max(extras) <= math.floor(0.2 * 24)
    spec = ActivationSpec(4)
    quantizer = dict(bits=4, group_size=-1, symmetric=False, scale_dtype=torch.float32)
    reference = x @ w.t()

    def loss_of(plan):
        module = QLLMLinear(
            w if plan is None else plan.weights[0], None, quantizer, spec, None if plan is None else plan.channel_map
        )
        return float((module(x) - reference).square().mean())

    result = search_threshold(x, [w], m, loss_of, 0.2)
    assert result.loss <= result.loss_without
    assert all(extra <= 4 for _, extra, _ in result.evaluated)
    assert result.loss == min(loss for _, _, loss in result.evaluated)
    official = search_threshold(x, [w], m, loss_of, 0.2, consider_no_reassembly=False)
    assert all(extra > 0 for _, extra, _ in official.evaluated)


def test_reassembly_halves_the_w4a4_error_of_planted_100x_outliers():
    # Splitting must bring a 100x outlier near the others within the budget (0.2 C), hence C = 1024.
    x = torch.randn(256, 1024, generator=gen(13))
    x[:, [5, 40]] *= 100
    w = torch.randn(48, 1024, generator=gen(14)) / 8
    spec = ActivationSpec(4)
    quantizer = dict(bits=4, group_size=-1, symmetric=False, scale_dtype=torch.float32)
    reference = x @ w.t()
    plain = float((QLLMLinear(w, None, quantizer, spec)(x) - reference).square().mean())

    def loss_of(plan):
        module = QLLMLinear(
            w if plan is None else plan.weights[0], None, quantizer, spec, None if plan is None else plan.channel_map
        )
        return float((module(x) - reference).square().mean())

    result = search_threshold(x[:64], [w], channel_magnitudes(x), loss_of, 0.2, mode="paper", max_candidates=12)
    assert result.best is not None
    assert loss_of(result.best) * 2 <= plain


# ----------------------------------------------------------------------------------------------
# Quantizers


def test_activation_quantizer_matches_the_official_formulas_and_passes_gradients():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0]], requires_grad=True)
    out = fake_quantize_tokens(x, 4)
    s = 3.0 / 15
    z = round(1.0 / s)
    expected = (torch.clamp(torch.round(x[0].detach() / s) + z, 0, 15) - z) * s
    torch.testing.assert_close(out[0].detach(), expected)
    assert torch.isfinite(out).all()  # a constant token: the scale clamps to 1e-5, no NaN
    torch.testing.assert_close(out[1].detach(), x[1].detach(), atol=1e-4, rtol=0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    sym = fake_quantize_tokens(torch.tensor([[-7.0, 3.5, 1.0]]), 4, symmetric=True)
    torch.testing.assert_close(sym, torch.tensor([[-7.0, 4.0, 1.0]]))


def test_weight_fake_quantizer_equals_the_exported_rtn_grid():
    w = torch.randn(12, 40, generator=gen(15))
    w[3] = 0.25  # a constant row
    for scale_dtype in (torch.float32, torch.bfloat16):
        rtn = quantize_uniform(w, 4, -1, False, scale_dtype)
        assert torch.equal(fake_quantize_weight(w, 4, -1, False, scale_dtype), rtn.dequantize(torch.float32))


# ----------------------------------------------------------------------------------------------
# Error correction


def test_lora_starts_at_zero_merges_exactly_and_has_rank_r():
    w = torch.randn(20, 32, generator=gen(16))
    quantizer = dict(bits=4, group_size=-1, symmetric=False, scale_dtype=torch.float32)
    module = QLLMLinear(w, torch.randn(20), quantizer, ActivationSpec(8))
    x = torch.randn(5, 32, generator=gen(17))
    before = module(x)
    module.add_lora(4, 1.0, "post_quant", gen(18))
    assert torch.equal(module(x), before)  # B = 0: bit-exact at step 0
    with torch.no_grad():
        module.lora_b.normal_(generator=gen(19))
    delta = module.merged_weight() - w
    assert torch.linalg.matrix_rank(delta).item() <= 4
    full = QLLMLinear(w, None, {**quantizer, "bits": 8}, None)
    full.add_lora(4, 1.0, "pre_quant", gen(18))
    with torch.no_grad():
        full.lora_b.copy_(module.lora_b)
    merged = QLLMLinear(full.merged_weight().detach(), None, {**quantizer, "bits": 8}, None)
    assert torch.equal(full(x), merged(x))  # pre_quant is exactly what the merge deploys


# ----------------------------------------------------------------------------------------------
# Reassembly on real architectures: exact in fp32


class MappedLinear(nn.Module):
    """W'' (P x) + b, unquantized: what reassembly alone computes."""

    def __init__(self, weight, bias, channel_map):
        super().__init__()
        self.weight, self.bias, self.channel_map = weight, bias, channel_map

    def forward(self, x):
        return nn.functional.linear(self.channel_map.apply(x), self.weight.to(x.dtype), self.bias)


def plant(model, duplicates=range(40, 72)):
    """Outlier channels at the three points of every block, and a run of consumer columns made equal,
    so that merging any two of them is exact: reassembly must then leave the logits unchanged."""
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[3] *= 40
            block.post_attention_layernorm.weight[9] *= 40
            block.mlp.up_proj.weight[11] *= 40
            for module in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.mlp.gate_proj,
                block.mlp.up_proj,
                block.mlp.down_proj,
            ):
                module.weight[:, list(duplicates)] = module.weight[:, duplicates[0]][:, None]


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_reassembly_alone_is_exact_in_fp32(tiny_models, architecture):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[architecture], dtype=torch.float32).eval()
    plant(model)
    ids = torch.randint(0, 320, (3, 21), generator=gen(20))
    with torch.no_grad():
        reference = model(ids).logits
    points = {
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "down_in": ("mlp.down_proj",),
    }
    features, hooks = {}, []
    for index, block in enumerate(model.model.layers):
        for point, names in points.items():
            hooks.append(
                block.get_submodule(names[0]).register_forward_pre_hook(
                    lambda m, args, key=(index, point): features.__setitem__(
                        key, args[0].detach().reshape(-1, args[0].shape[-1])
                    )
                )
            )
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    extras = []
    for index, block in enumerate(model.model.layers):
        for point, names in points.items():
            x = features[(index, point)]
            m = channel_magnitudes(x)
            plan = reassemble(
                x, [block.get_submodule(n).weight.detach() for n in names], m, float(m.max()) / 3.5, mode="paper"
            )
            extras.append(plan.extra)
            for name, weight in zip(names, plan.weights):
                block.set_submodule(name, MappedLinear(weight, block.get_submodule(name).bias, plan.channel_map))
    assert min(extras) >= 3  # every point split its outlier and merged as many pairs
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The step: planted outliers, error correction, export and load


def recipe(calibration_file, step, samples=4, **export):
    return Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": samples, "seq_len": 32, "seed": 0},
            "steps": [step],
            "export": export or {"format": "auto"},
        }
    )


def run_session(path, chosen):
    session = Session(ModelHandle.open(path), chosen, AutoTokenizer.from_pretrained(path), progress=False, batch_size=4)
    report = session.run()
    return session, {row["module"].split(".", 3)[-1]: row for row in report.rows if row["step"] == "qllm"}


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """One block (hidden 256) whose three reassembly points carry two 100x activation channels each;
    their consumers' columns are divided by 100, so the fp function is a normal one (as in real LLMs,
    where the massive channels meet small weights) and only activation quantization suffers."""
    from compressor.testing import make_random_model

    path = make_random_model(
        "llama",
        tmp_path_factory.mktemp("planted") / "model",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[[3, 70]] *= 100
            block.post_attention_layernorm.weight[[9, 80]] *= 100
            block.mlp.up_proj.weight[[11, 90]] *= 100
            for module in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                module.weight[:, [3, 70]] /= 100
            for module in (block.mlp.gate_proj, block.mlp.up_proj):
                module.weight[:, [9, 80]] /= 100
            block.mlp.down_proj.weight[:, [11, 90]] /= 100
    model.save_pretrained(path)
    return path


QUICK = {"feature_samples": 2, "search_candidates": 8, "merge_score": "paper"}


def test_planted_outliers_reassembly_halves_the_block_error_and_error_correction_lowers_it_again(
    planted_model, calibration_file, tmp_path
):
    _, plain = run_session(planted_model, recipe(calibration_file, {"qllm": {"reassembly": False, "rank": 0, **QUICK}}))
    corrected = {"qllm": {"epochs": 2, "lr": 1e-3, "heldout": 0.0, **QUICK}}
    session, rows = run_session(planted_model, recipe(calibration_file, corrected))
    assert all(rows[f"reassembly.{p}"]["extra_channels"] > 0 for p in ("attn_in", "mlp_in", "down_in"))
    assert rows["error_correction"]["mse_init"] * 2 <= plain["error_correction"]["mse_init"]  # reassembly alone
    assert rows["error_correction"]["mse_final"] < rows["error_correction"]["mse_init"]  # then error correction, merged
    assert rows["error_correction"]["peak_memory_mib"] > 0

    config, ours = export_and_load(session, tmp_path / "out")
    assert config["quant_method"] == "compressor" and config["format"] == "uniform"
    assert set(config["attention_activations"]) == {"model.layers.0.self_attn"}
    assert config["modules"]["model.layers.0.mlp.down_proj"]["input_map"] > 0
    assert config["modules"]["model.layers.0.self_attn.o_proj"]["input_map"] == 0
    down = ours.get_submodule("model.layers.0.mlp.down_proj")
    assert down.channel_map is not None and down.input_activations == ActivationSpec(4)


def export_and_load(session, out):
    """The model a session left in memory, exported by the writer ``apply`` uses, loaded by us and by
    transformers: both give the in-memory logits. Returns the quantization_config and our loaded model."""
    from compressor.export import CheckpointWriter

    handle = session.handle
    for name in handle.outside_block_modules():
        handle.materialize(name, "cpu", torch.float32)
    ids = torch.randint(0, 320, (2, 19), generator=gen(21))
    with torch.no_grad():
        in_memory = handle.model(ids).logits
    out.mkdir()
    writer = CheckpointWriter(out, session.recipe.export, torch.float32)
    for index in range(len(handle.blocks)):
        writer.write_module(handle.block_prefix(index), handle.blocks[index])
    writer.finish(handle, session.recipe, session.report)
    config = __import__("json").loads((out / "config.json").read_text())["quantization_config"]
    ours = load_quantized_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, in_memory, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(ids).logits, in_memory, rtol=1e-4, atol=1e-4)
    return config, ours


# Groups of blocks and the final norm

GROUPED = {"epochs": 2, "lr": 2e-3, "heldout": 0.0, "feature_samples": 2, "search_candidates": 4}


def block_weights(session, index):
    """Block ``index``'s quantized weights as stored (codes and scales), by name."""
    return {name: tensor.clone() for name, tensor in session.handle.blocks[index].state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_block_models(tmp_path_factory):
    """A random two-block Llama, and the same with block 1's MLP changed (block 0 unchanged)."""
    from compressor.testing import make_random_model

    root = tmp_path_factory.mktemp("groups")
    path = make_random_model("llama", root / "model", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    model.save_pretrained(root / "changed")
    AutoTokenizer.from_pretrained(path).save_pretrained(root / "changed")
    return path, root / "changed"


def test_a_group_trains_against_the_group_output_and_one_block_groups_do_not_look_ahead(
    two_block_models, calibration_file
):
    """Block 0's result depends on block 1 only when both train together against block 1's fp output: with
    group_blocks 1 changing block 1 leaves block 0 exactly as it was; with 2 it changes it."""
    path, changed = two_block_models
    results = {}
    for groups in (1, 2):
        for model in (path, changed):
            session, rows = run_session(model, recipe(calibration_file, {"qllm": {"group_blocks": groups, **GROUPED}}))
            results[groups, model] = block_weights(session, 0), rows
    assert same(results[1, path][0], results[1, changed][0])
    assert not same(results[2, path][0], results[2, changed][0])
    rows = results[2, path][1]
    assert rows["error_correction"]["blocks"] == [0, 1] and rows["error_correction"]["steps"] > 0
    assert rows["error_correction"]["mse_trained"] < rows["error_correction"]["mse_init"]
    assert results[1, path][1]["error_correction"]["blocks"] == [1]  # one row a block (this is the last's)


def test_a_group_longer_than_the_model_is_the_whole_model_and_the_final_norm_tunes_and_exports(
    two_block_models, calibration_file, tmp_path
):
    path, _ = two_block_models
    whole, _ = run_session(path, recipe(calibration_file, {"qllm": {"group_blocks": 2, **GROUPED}}))
    longer, _ = run_session(path, recipe(calibration_file, {"qllm": {"group_blocks": 5, **GROUPED}}))
    for index in (0, 1):
        assert same(block_weights(whole, index), block_weights(longer, index))

    step = {"qllm": {"group_blocks": 2, "tune_final_norm": True, **GROUPED}}
    session, _ = run_session(path, recipe(calibration_file, step))
    (row,) = [r for r in session.report.rows if r["step"] == "qllm" and r["module"] == "model.norm"]
    assert row["mse_final"] < row["mse_init"]
    for index in (0, 1):  # the blocks are those of the run without it
        assert same(block_weights(whole, index), block_weights(session, index))
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.norm.weight
    assert not torch.equal(session.handle.model.model.norm.weight.float(), original)
    tuned = session.handle.model.model.norm.weight.detach().float().clone()
    _, ours = export_and_load(session, tmp_path / "out")  # the tuned norm is exported: equal logits
    torch.testing.assert_close(ours.model.norm.weight, tuned)


def test_a_grouped_step_does_not_share_its_pass_with_a_one_block_step(tiny_llama, calibration_file):
    from compressor.errors import StepError

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    chosen = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32, "seed": 0},
            "steps": [
                {"qllm": {"group_blocks": 2, "ignore": ["gate_proj", "up_proj", "down_proj"]}},
                {"rtn": {"ignore": attention}},
            ],
        }
    )
    with pytest.raises(StepError) as error:
        Session(ModelHandle.open(tiny_llama), chosen, AutoTokenizer.from_pretrained(tiny_llama), progress=False).run()
    assert "steps[0].qllm.group_blocks: 2 compresses blocks in groups, and rtn" in str(error.value)
    assert "\n" not in str(error.value)


def test_weight_only_exports_compressed_tensors_that_plain_transformers_loads(tiny_llama, calibration_file, tmp_path):
    step = {"qllm": {"weight_only": True, "symmetric": True, "epochs": 1, "rank": 2}}
    apply(recipe(calibration_file, step), tiny_llama, tmp_path / "out", progress=False)
    config = __import__("json").loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    ids = torch.randint(0, 320, (2, 19), generator=gen(22))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids).logits
        ours = load_quantized_model(tmp_path / "out")(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_error_correction_trains_only_the_branches_and_norms_and_lowers_the_loss(tiny_llama):
    from compressor.training import micro_batches, train_block

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    block = model.model.layers[0]
    ids = torch.randint(0, 320, (4, 16), generator=gen(23))
    captured = {}
    hook = block.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(x=args[0] if args else kwargs["hidden_states"], kwargs=kwargs),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(ids, use_cache=False)
    hook.remove()
    x, kwargs = captured["x"], {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    with torch.no_grad():
        target = block(x, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    quantizer = dict(bits=3, group_size=-1, symmetric=False, scale_dtype=torch.float32)
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            block.set_submodule(name, QLLMLinear(module.weight, module.bias, quantizer, ActivationSpec(6)))
    frozen_before = {n: b.clone() for n, b in block.named_buffers()}
    generator = gen(24)
    for module in block.modules():
        if isinstance(module, QLLMLinear):
            module.add_lora(4, 1.0, "post_quant", generator)
    parameters = qllm.trainable_parameters(block, True)
    names = {n for n, p in block.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_a", "lora_b")) or "norm" in n for n in names)
    batches = micro_batches([x], [target], [kwargs], 1)
    losses, _ = train_block(
        block, batches, [{"params": parameters, "lr": 2e-3}], 4, 1.0, schedule=qllm.linear_decay, where="qllm"
    )
    assert losses[-1] < losses[0]
    for name, buffer in block.named_buffers():  # the frozen weights are untouched
        assert torch.equal(buffer, frozen_before[name]), name


@pytest.mark.parametrize(
    "step,message",
    [
        (
            {"qllm": {"activation_bits": 16, "reassembly": True}},
            "steps[0].qllm.reassembly: channel reassembly only serves activation quantization",
        ),
        (
            {"qllm": {"weight_only": True, "activation_bits": 4}},
            "steps[0].qllm.activation_bits: 4 contradicts weight_only: true",
        ),
        ({"qllm": {"activation_bits": 9}}, "steps[0].qllm.activation_bits: 9 is not one of"),
        ({"qllm": {"merge_score": "fast"}}, "steps[0].qllm.merge_score: 'fast' is not one of code, paper"),
        ({"qllm": {"channel_ratio": 0.9}}, "steps[0].qllm.channel_ratio: 0.9 is above the maximum 0.5"),
        ({"rtn": {"activation_bits": 1}}, "steps[0].rtn.activation_bits: 1 is not one of"),
    ],
)
def test_bad_keys_are_one_line_errors(step, message):
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict({"steps": [step]})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_recipes_validate():
    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("qllm-w4a4.yaml", "qllm-w4a8.yaml", "qllm-w4.yaml", "rtn-w4a4.yaml", "rtn-w4a8.yaml"):
        Recipe.from_yaml(root / name)


def test_activation_bits_on_lookup_table_weights_stop_before_the_step_works(
    tiny_llama, calibration_file, tmp_path, registered
):
    from dataclasses import dataclass

    from compressor.errors import StepError
    from compressor.step import Step
    from compressor.weights.values import LUTWeight

    @registered("test_lut_maker")
    @dataclass
    class LUTMaker(Step):
        needs_calibration = False

        def compress_block(self, context):
            for name, linear in context.linears([]).items():
                n, k = linear.weight.shape
                context.replace_linear(
                    name, LUTWeight(codes=torch.zeros(n, k, dtype=torch.uint8), lut=torch.zeros(n, 4), bits=2)
                )

    for step in ({"rtn": {"activation_bits": 4}}, {"qllm": {}}):
        chosen = Recipe.from_dict(
            {
                "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 16},
                "steps": [{"test_lut_maker": {}}, step],
            }
        )
        with pytest.raises(StepError) as error:
            apply(chosen, tiny_llama, tmp_path / "out", progress=False)
        assert "activation_bits" in str(error.value) and "'lut' weights from an earlier step" in str(error.value)
        assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_dequantizing_folds_the_channel_map_into_the_dense_weight():
    from compressor.modules.linear import QuantizedLinear, dequantize_model_

    x = torch.randn(40, 24, generator=gen(25))
    x[:, 2] *= 30
    w = torch.randn(10, 24, generator=gen(26))
    m = channel_magnitudes(x)
    plan = reassemble(x, [w], m, float(m.max()) / 3)
    assert plan.extra > 0
    module = QuantizedLinear(
        quantize_uniform(plan.weights[0], 4, -1, False, torch.float32), torch.randn(10, generator=gen(27))
    )
    module.quantize_inputs(None, plan.channel_map)
    holder = nn.Sequential(module)
    expected = holder(x)
    assert dequantize_model_(holder, torch.float32) == 1 and isinstance(holder[0], nn.Linear)
    torch.testing.assert_close(holder(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4"])
def test_reassembly_for_fp4_activations_lowers_the_block_error_and_exports_native(
    grid, planted_model, calibration_file, tmp_path
):
    """Planted 100x channels: on FP4 activation grids too (blocks of 16 / 32 channels sharing a scale), splitting
    them lowers the block's error; the native export (FP4 activation spec + channel maps) loads with our logits."""
    base = {"activation_grid": grid, "rank": 0, **QUICK}
    _, plain = run_session(planted_model, recipe(calibration_file, {"qllm": {**base, "reassembly": False}}))
    _, rows = run_session(planted_model, recipe(calibration_file, {"qllm": base}))
    assert any(rows[f"reassembly.{p}"]["extra_channels"] > 0 for p in ("attn_in", "mlp_in", "down_in"))
    assert rows["error_correction"]["mse_init"] < 0.8 * plain["error_correction"]["mse_init"]
    apply(recipe(calibration_file, {"qllm": base}), planted_model, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    entry = config["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["input_activations"]["type"] == "float" and entry["input_map"] > 0
    import compressor  # noqa: F401  (registers the native format with transformers)

    ids = torch.randint(0, 320, (2, 19), generator=gen(22))
    ours = load_quantized_model(tmp_path / "out")(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids).logits
    assert torch.equal(ours, theirs)
