"""GPTQ: identities with RTN, agreement with the column-by-column OBS update it accelerates, lower output
error than RTN, static activation order keeping the groups, true-sequential Hessians inside a block, and the
whole path through ``compressor.apply`` and the export."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import Recipe, apply
from compressor.arch import ADAPTERS
from compressor.export import gptq as gptq_format
from compressor.export import load_quantized_model
from compressor.quant import gptq
from compressor.quant.gptq import GPTQ, add_to_hessian, gptq_quantize, hessian, sequential_groups
from compressor.quant.uniform import minmax_params, quantize_codes, quantize_uniform
from compressor.recipe import RecipeError
from compressor.weights.values import UniformWeight

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Tokens whose channels are mixed (off-diagonal Hessian) and of unequal size (a few large channels)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=generator) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=generator) @ mix
    x[:, torch.randperm(k, generator=generator)[:4]] *= 6
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(x.shape[-1], x.shape[-1])
    return hessian(total, add_to_hessian(total, x))


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: UniformWeight) -> float:
    return float((x @ (weight - quantized.dequantize(torch.float32)).T).norm() / (x @ weight.T).norm())


def same_weight(a: UniformWeight, b: UniformWeight) -> bool:
    zeros = (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)
    return torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and zeros and a.group_size == b.group_size


# ----------------------------------------------------------------------------------------------
# The algorithm on one matrix


def test_hessian_is_a_plain_sum_and_a_count():
    x = torch.randn(3, 10, 16)
    total = torch.zeros(16, 16)
    tokens = add_to_hessian(total, x[:2]) + add_to_hessian(total, x[2:])
    assert tokens == 30
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(hessian(total, tokens), 2 / 30 * flat.T @ flat)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", ["none", "static"])
def test_identity_hessian_gives_rtn_exactly(bits, group_size, symmetric, actorder):
    """H = c I (orthonormal inputs) leaves no error to compensate: GPTQ is RTN, bit for bit, in any order."""
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    orthonormal, _ = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(1)))
    rtn = quantize_uniform(weight, bits, group_size, symmetric, torch.float16)
    for h in (torch.eye(128), hessian_of(3.0 * orthonormal)):
        result = gptq_quantize(weight, h, bits, group_size, symmetric, torch.float16, block_size=48, actorder=actorder)
        assert same_weight(result.weight, rtn)


@pytest.mark.parametrize("group_size", [32, -1])
def test_diagonal_hessian_with_activation_order_is_rtn(group_size):
    """A diagonal H of distinct entries permutes the columns but couples none: the permutation and the static
    groups must undo exactly, back to RTN."""
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.1)
    result = gptq_quantize(weight, h, 3, group_size, False, torch.float32, actorder="static")
    assert same_weight(result.weight, quantize_uniform(weight, 3, group_size, False, torch.float32))


def obs_reference(weight, h, bits, group_size, symmetric, actorder, dampening_frac=0.01):
    """The optimal-brain-surgeon update GPTQ computes, written the slow way in float64: for each column in
    turn, round it and move the remaining columns by -err * (H_F^-1)[q, :] / (H_F^-1)[q, q], with H_F^-1 the
    explicit inverse of the remaining columns' Hessian (no Cholesky, no blocks). Grids as documented:
    static groups and per-channel from the original weights, lazy groups from the current ones."""
    n, k = weight.shape
    w, h = weight.double().clone(), h.double().clone()
    lazy = group_size != -1 and actorder == "none"
    scales, zeros = minmax_params(weight, bits, group_size, symmetric, torch.float32)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if actorder == "static" else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += dampening_frac * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    for i in range(k):
        column = int(order[i])
        group = 0 if group_size == -1 else column // group_size
        if lazy and i % group_size == 0:
            scale, zero = minmax_params(w[:, i : i + group_size].float(), bits, -1, symmetric, torch.float32)
            scales[:, group] = scale[:, 0]
            if zeros is not None:
                zeros[:, group] = zero[:, 0]
        zero = None if zeros is None else zeros[:, group : group + 1]
        code = quantize_codes(w[:, i : i + 1].float(), scales[:, group : group + 1], zero, bits, -1)
        q = UniformWeight(code, scales[:, group : group + 1], zero, bits, -1).dequantize(torch.float32)
        codes[:, column] = code[:, 0]
        inverse = torch.linalg.inv(h[i:, i:])
        w[:, i:] -= ((w[:, i] - q[:, 0].double()) / inverse[0, 0])[:, None] * inverse[0][None, :]
    return codes


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", ["none", "static"])
def test_blocked_cholesky_form_equals_the_column_by_column_update(group_size, symmetric, actorder):
    """Blocks of 128 (one block), 20 and 7 columns (groups that start mid-block and reach into the next: the
    pending updates) all give the reference's codes, up to float32 rounding at a few grid boundaries."""
    x = correlated_inputs(1024, 96, seed=2)
    h = hessian_of(x)
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    expected = obs_reference(weight, h, 3, group_size, symmetric, actorder)
    for block_size in (128, 20, 7):
        codes = gptq_quantize(weight, h, 3, group_size, symmetric, torch.float32, block_size, actorder=actorder)
        assert (codes.weight.codes != expected).float().mean() <= 0.01, block_size


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_output_error_is_well_below_rtn(bits, group_size, symmetric):
    x = correlated_inputs(2048, 128, seed=bits)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(7))
    h = hessian_of(x)
    rtn = output_error(x, weight, quantize_uniform(weight, bits, group_size, symmetric, torch.float16))
    for actorder in ("none", "static"):
        result = gptq_quantize(weight, h, bits, group_size, symmetric, torch.float16, actorder=actorder)
        assert output_error(x, weight, result.weight) < 0.8 * rtn, actorder
        # the sum of the per-column losses is the quadratic's value at the end: 1/2 tr(D (H + lambda I) D^T)
        d = weight - result.weight.dequantize(torch.float32)
        damped = h + result.damping * h.diagonal().mean() * torch.eye(128)
        assert result.loss == pytest.approx(float(((d @ damped) * d).sum() / 2), rel=1e-3)


def test_static_activation_order_keeps_the_original_groups():
    """Columns are quantized out of order, yet every group is the original consecutive columns with its
    min-max grid: the export's g_idx is trivial (what vLLM's Marlin accepts) and the result beats RTN."""
    x = correlated_inputs(2048, 128, seed=4)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    h = hessian_of(x)
    ordered = gptq_quantize(weight, h, 4, 32, False, torch.float16, actorder="static").weight
    plain = gptq_quantize(weight, h, 4, 32, False, torch.float16, actorder="none").weight
    scales, zeros = minmax_params(weight, 4, 32, False, torch.float16)
    assert ordered.group_size == 32 and torch.equal(ordered.scales, scales) and torch.equal(ordered.zeros, zeros)
    assert gptq_format.to_tensors(ordered, torch.float16)["g_idx"].tolist() == [i // 32 for i in range(128)]
    assert not torch.equal(ordered.codes, plain.codes)  # the order did change the rounding
    rtn = quantize_uniform(weight, 4, 32, False, torch.float16)
    assert output_error(x, weight, ordered) < 0.8 * output_error(x, weight, rtn)


def test_dead_inputs_get_zero_weights_and_singular_hessians_more_damping():
    x = correlated_inputs(16, 64, seed=6)  # 16 tokens for 64 columns: H has rank 16
    x[:, 5] = 0
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    result = gptq_quantize(weight, hessian_of(x), 3, 32, False, torch.float32, dampening_frac=0.0)
    assert result.damping == pytest.approx(0.01)  # 0 fails; the first retry is 10 x 0.001
    dense = result.weight.dequantize(torch.float32)
    assert torch.isfinite(dense).all() and torch.equal(dense[:, 5], torch.zeros(8))


# ----------------------------------------------------------------------------------------------
# True-sequential Hessians in a block


def test_sequential_groups_follow_the_block():
    llama = ADAPTERS[0]
    paths = dict(llama.linears)
    linears = {path: None for path in paths.values()} | {"mlp.extra_proj": None}
    assert sequential_groups(llama, linears) == [
        [paths["q"], paths["k"], paths["v"]],
        [paths["o"]],
        [paths["gate"], paths["up"]],
        [paths["down"]],
        ["mlp.extra_proj"],
    ]
    del linears[paths["k"]], linears[paths["o"]]
    assert sequential_groups(llama, linears)[:2] == [[paths["q"], paths["v"]], [paths["gate"], paths["up"]]]


def recipe(calibration_file, *steps, **export):
    calibration = {"dataset": calibration_file, "samples": 8, "seq_len": 32, "seed": 0}
    return Recipe.from_dict({"calibration": calibration, "steps": list(steps), "export": export or {"format": "auto"}})


LLAMA_ORDER = [ADAPTERS[0].linears[role] for role in ("q", "k", "v", "o", "gate", "up", "down")]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_group_sees_the_groups_before_it_quantized(
    tiny_llama, calibration_file, tmp_path, monkeypatch, true_sequential
):
    """When a linear is quantized, its Hessian must be the one of the block as it is now (earlier groups
    quantized) with true_sequential, and is stale from o_proj on without: rerun the block and compare."""
    calls, stale = [], []
    original = GPTQ.quantize_linear

    def checked(self, context, name, linear, h, *rest):
        with torch.no_grad(), gptq.HessianCatcher(context.block, [name]) as catcher:
            context.forward()
        calls.append(name)
        if not torch.allclose(catcher.hessian(name), h, rtol=1e-5, atol=1e-7):
            stale.append(name)
        return original(self, context, name, linear, h, *rest)

    monkeypatch.setattr(GPTQ, "quantize_linear", checked)
    step = {"gptq": {"bits": 3, "group_size": 32, "true_sequential": true_sequential}}
    apply(recipe(calibration_file, step), tiny_llama, tmp_path / "out", progress=False)
    assert calls == LLAMA_ORDER * 2
    assert stale == ([] if true_sequential else LLAMA_ORDER[3:] * 2)


def kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("bits,symmetric,method", [(4, True, "compressed-tensors"), (3, False, "gptq")])
def test_export_loads_and_is_closer_to_the_original_than_rtn(
    tiny_llama, calibration_file, tmp_path, bits, symmetric, method
):
    quantizer = {"bits": bits, "group_size": 32, "symmetric": symmetric}
    report = apply(recipe(calibration_file, {"gptq": quantizer}), tiny_llama, tmp_path / "gptq", progress=False)
    apply(recipe(calibration_file, {"rtn": quantizer}), tiny_llama, tmp_path / "rtn", progress=False)
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == method
    rows = [row for row in report.rows if row["step"] == "gptq"]
    assert len(rows) == 14 and all(row["output_error"] < row["rtn_output_error"] for row in rows)
    tokens = AutoTokenizer.from_pretrained(tiny_llama)(open(calibration_file).read())["input_ids"]
    x = torch.tensor(tokens[: 4 * 48]).reshape(4, 48)
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(x).logits
        ours = load_quantized_model(tmp_path / "gptq")(x).logits
        rtn = load_quantized_model(tmp_path / "rtn")(x).logits
    assert kl_to(original, ours) < 0.8 * kl_to(original, rtn)


# ----------------------------------------------------------------------------------------------
# Recipes and errors


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"block_size": 0}, "steps[0].gptq.block_size: 0 is below the minimum 1"),
        ({"dampening_frac": -1}, "steps[0].gptq.dampening_frac: -1 is below the minimum"),
        ({"actorder": "dynamic"}, "steps[0].gptq.actorder: 'dynamic' is not one of static, none"),
        ({"bits": 9}, "steps[0].gptq.bits: 9 is not one of 2..8"),
        ({"group_size": 0}, "steps[0].gptq.group_size: 0 is not -1 or a positive integer"),
    ],
)
def test_bad_keys_are_one_line_errors(settings, message):
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict({"steps": [{"gptq": settings}]})
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_rounds_lower_the_output_error_and_keep_the_grid_storable(symmetric):
    """``refit_rounds``: least-squares scales for the sweep's codes, then a new sweep; the state kept has a lower
    tr(D H D^T) than plain GPTQ's, positive fp16 scales, the same zeros, and its loss is half that trace."""
    x = correlated_inputs(512, 128, 9)
    h = hessian_of(x)
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(10))
    plain = gptq_quantize(weight, h, 2, 32, symmetric, torch.float16)
    refit = gptq_quantize(weight, h, 2, 32, symmetric, torch.float16, refit_rounds=2)
    trace = [gptq.weighted_output_error(weight, r.weight.dequantize(torch.float32), h) for r in (plain, refit)]
    assert trace[1] < 0.97 * trace[0]
    assert refit.weight.scales.dtype == torch.float16 and bool((refit.weight.scales > 0).all())
    assert (refit.weight.zeros is None) == symmetric
    if not symmetric:
        assert torch.equal(refit.weight.zeros, plain.weight.zeros)
    assert refit.loss == pytest.approx(trace[1] / 2, rel=1e-4)


def test_static_nvfp4_hessians_see_the_inputs_under_the_calibrated_global_scale():
    """activation_global_scale: calibrated: GPTQ's Hessian is that of the inputs as the exported layer quantizes
    them (one input_global_scale per layer), not under a per-token global scale."""
    from compressor.modules.activations import ActivationSpec, quantize_activations
    from compressor.weights.values import nvfp4_global_scale

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 8))
    x = torch.randn(3, 16, 64) * torch.logspace(-2, 1, 16)[None, :, None]  # tokens of very different ranges
    spec = ActivationSpec(4, True, "nvfp4", static_global_scale=True)
    scale = nvfp4_global_scale(x.abs().amax().reshape(1))

    def hessian_of(spec, scales):
        with torch.no_grad(), gptq.HessianCatcher(block, ["0"], spec, scales) as catcher:
            block(x)
        return catcher.hessian("0")

    with torch.no_grad(), gptq.HessianCatcher(block, ["0"]) as catcher:  # reference: inputs quantized first
        block[0](quantize_activations(x, spec, scale))
    expected = catcher.hessian("0")
    assert torch.allclose(hessian_of(spec, {"0": scale}), expected, rtol=1e-5, atol=1e-7)
    per_token = ActivationSpec(4, True, "nvfp4")
    assert not torch.allclose(hessian_of(per_token, None), expected, rtol=1e-3, atol=1e-6)
