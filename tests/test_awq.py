"""AWQ: the folded block computes what the original did (exactly, up to fp32), clamped weights round onto the
searched ranges, scales tie over grouped-query heads, awq + rtn is closer to the original than rtn alone on a
model with outlier channels, and the refusals are one line before any work."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import Recipe, apply
from compressor.arch import adapter_for
from compressor.errors import UserError
from compressor.quant.awq import (
    ScalePoint,
    check_foldable,
    clamp_to_clipped_range,
    fake_quantize,
    fold_scale,
    scale_points,
    search_clip,
)
from compressor.quant.uniform import minmax_params, quantize_codes, quantize_uniform
from compressor.testing import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(calibration_file, *steps):
    calibration = {"dataset": calibration_file, "samples": 8, "seq_len": 32, "seed": 0}
    return Recipe.from_dict({"calibration": calibration, "steps": list(steps), "export": {"format": "dense"}})


def sample_tokens(model_path, calibration_file) -> torch.Tensor:
    tokens = AutoTokenizer.from_pretrained(model_path)(open(calibration_file).read())["input_ids"]
    return torch.tensor(tokens[: 4 * 48]).reshape(4, 48)


def logits_of(path, x) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(x).logits


def kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


# ----------------------------------------------------------------------------------------------
# Folding


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_folded_model_computes_the_same_function(tiny_models, calibration_file, tmp_path, architecture):
    """With clipping off, the step only folds scales: the dense export gives the original logits (fp32), while
    its norms and weights did change (the scales are not all 1)."""
    path = tiny_models[architecture]
    report = apply(
        recipe(calibration_file, {"awq": {"bits": 2, "group_size": 32, "clip": False}}),
        path,
        tmp_path / "out",
        progress=False,
    )
    alphas = [row["alpha"] for row in report.rows if "alpha" in row]
    assert len(alphas) == 8 and any(alpha > 0 for alpha in alphas)  # 4 points in each of 2 blocks
    x = sample_tokens(path, calibration_file)
    original, folded = logits_of(path, x), logits_of(tmp_path / "out", x)
    torch.testing.assert_close(folded, original, rtol=1e-4, atol=1e-4)
    before = AutoModelForCausalLM.from_pretrained(path).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("input_layernorm" in name for name in changed) and any("v_proj" in name for name in changed)


def test_fold_scale_keeps_each_block_output_and_ties_kv_heads(tiny_llama):
    """Random scales at every point of a GQA block (4 query heads on 2 KV heads): same output up to fp32."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    adapter_points = scale_points(adapter_for(model.config), model.config)
    assert [p.before for p in adapter_points] == [
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]
    assert adapter_points[1].heads == (2, 2, 32)
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        reference = model(x).logits
        generator = torch.Generator().manual_seed(0)
        for block in model.model.layers:
            for point in adapter_points:
                width = block.get_submodule(point.before).weight.shape[0]
                fold_scale(block, point, torch.rand(width, generator=generator) * 4 + 0.25)
        folded = model(x).logits
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


def test_grouped_query_scales_repeat_per_query_head():
    point = ScalePoint("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", heads=(2, 3, 4))
    scale = torch.arange(8.0) + 1
    columns = point.consumer_scale(scale).view(2, 3, 4)
    assert torch.equal(columns, scale.view(2, 1, 4).expand(2, 3, 4))
    assert torch.equal(point.before_statistic(columns.reshape(-1)), scale)


# ----------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize("symmetric", [True, False])
def test_clamped_weights_round_onto_the_clipped_ranges(symmetric):
    """Clamping to the searched range is what makes any quantizer after it use that range: RTN of the clamped
    weight has the clipped scales (and zeros), and its codes are those of rounding the original with the clip
    factors, but for weights clamped to a range end, which may land one step inside (the end is rarely a grid
    point once the scale is rounded to its storage dtype)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=generator)
    clip = torch.tensor([1.0, 0.9, 0.75, 0.55])[torch.randint(0, 4, (16, 4), generator=generator)]
    clamped = clamp_to_clipped_range(weight, clip, 32, symmetric)
    rtn = quantize_uniform(clamped, 3, 32, symmetric, torch.float16)
    scales, zeros = minmax_params(weight, 3, 32, symmetric, torch.float16, clip)
    assert torch.equal(rtn.scales, scales)
    assert (rtn.zeros is None) == symmetric and (symmetric or torch.equal(rtn.zeros, zeros))
    searched = quantize_codes(weight, scales, zeros, 3, 32)
    differ = rtn.codes != searched
    assert (clamped[differ] != weight[differ]).all() and (rtn.codes.int() - searched.int()).abs().max() <= 1
    assert differ.float().mean() < 0.05


def test_clip_search_never_raises_a_groups_output_error():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 128, generator=generator)
    weight[:, 5] *= 8  # an outlier column that clipping should give up on
    x = torch.randn(256, 128, generator=generator)
    clip = search_clip(weight, x, 3, 32, False, torch.float16)

    def group_errors(q):
        return (torch.einsum("tgc,ngc->ntg", x.view(-1, 4, 32), (q - weight).view(32, 4, 32))).square().mean(1)

    chosen = group_errors(fake_quantize(weight, 3, 32, False, torch.float16, clip))
    plain = group_errors(fake_quantize(weight, 3, 32, False, torch.float16))
    assert (chosen <= plain * (1 + 1e-5)).all() and (chosen < plain).float().mean() > 0.25
    assert (clip < 1).any()


# ----------------------------------------------------------------------------------------------
# Quality and refusals


def test_awq_then_rtn_is_closer_to_the_original_than_rtn(tiny_llama, calibration_file, tmp_path):
    """A model whose hidden stream has outlier channels (norm gains x8 on 6 channels): AWQ protects the weights
    that read them, so awq + rtn beats rtn on held-out logits, and awq + gptq beats gptq."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[[3, 17, 40, 77, 90, 121]] *= 8
    outliers = tmp_path / "outliers"
    model.save_pretrained(outliers)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(outliers)
    grid = {"bits": 3, "group_size": 32, "symmetric": False}
    runs = {
        "rtn": [{"rtn": grid}],
        "awq+rtn": [{"awq": grid}, {"rtn": grid}],
        "gptq": [{"gptq": grid}],
        "awq+gptq": [{"awq": {**grid, "clip": False}}, {"gptq": grid}],
    }
    x = sample_tokens(outliers, calibration_file)
    reference = logits_of(outliers, x)
    kl = {}
    for name, steps in runs.items():
        apply(recipe(calibration_file, *steps), outliers, tmp_path / name, progress=False)
        kl[name] = kl_to(reference, logits_of(tmp_path / name, x))
    assert kl["awq+rtn"] < 0.8 * kl["rtn"], kl
    assert kl["awq+gptq"] < kl["gptq"], kl


def test_awq_after_a_quantizer_is_refused_in_one_line(tiny_llama, calibration_file, tmp_path):
    steps = [{"rtn": {"bits": 4, "group_size": 32}}, {"awq": {"bits": 4, "group_size": 32}}]
    with pytest.raises(UserError) as error:
        apply(recipe(calibration_file, *steps), tiny_llama, tmp_path / "out", progress=False)
    message = str(error.value)
    assert "\n" not in message and "steps[1].awq" in message and "comes before every quantizer" in message


def test_a_norm_without_a_gain_is_refused():
    """A family whose norm has no per-channel gain (a LayerNorm without affine parameters) cannot fold the scale."""
    block = nn.Module()
    block.norm = nn.LayerNorm(16, elementwise_affine=False)
    block.mlp = nn.Module()
    block.mlp.up = nn.Linear(16, 32)
    with pytest.raises(ValueError, match="has no per-channel gain of size 16.*cannot take the awq step"):
        check_foldable(block, ScalePoint("norm", ("mlp.up",), "mlp.up"), "model.layers.0")
