"""Float formats (FP8, NVFP4, MXFP4): rounding equal to compressed-tensors' own functions, exports that
transformers loads with the logits of the in-memory model, GPTQ on the FP4 grids, and one-line refusals."""

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.helpers import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)
from transformers import AutoModelForCausalLM

from compressor import Recipe, apply
from compressor.errors import UserError
from compressor.export import load_quantized_model
from compressor.quant.gptq import gptq_quantize, output_error
from compressor.weights.values import (
    E2M1_VALUES,
    FLOAT_GRIDS,
    FloatWeight,
    e2m1_codes,
    e2m1_values,
    fake_quantize_float_tokens,
)

PRESETS = {"fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}


def weight(n=256, k=384, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, 5] = 0.3  # an outlier: a block whose max is far from the rest
    w[7, :32] = 0  # an all-zero block
    return w


def ct_fake_quantize(w: torch.Tensor, grid: str) -> torch.Tensor:
    """compressed-tensors' own weight quantize-dequantize for the preset of ``grid`` (min-max observer)."""
    args = preset_name_to_scheme(PRESETS[grid], ["Linear"]).weights
    if grid == "fp8-block":
        blocks = w.reshape(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
        low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    elif grid == "fp8":
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        groups = w.reshape(w.shape[0], -1, args.group_size)
        low, high = groups.amin(-1), groups.amax(-1)
    global_scale = generate_gparam(w.amin(), w.amax()) if grid == "nvfp4" else None
    scale, zero = calculate_qparams(low, high, args, global_scale=global_scale)
    return fake_quantize(w, scale, zero, args, global_scale=global_scale)


def test_e2m1_rounds_like_compressed_tensors_ties_included():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    x = torch.cat([ties, -ties, torch.randn(4000) * 3, torch.tensor(E2M1_VALUES)])
    ours = e2m1_values(e2m1_codes(x))
    assert torch.equal(ours, cast_to_fp4(x.clone()))
    assert ours[:7].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to the even mantissa (OCP MX 5.3.3)


@pytest.mark.parametrize("grid", list(FLOAT_GRIDS))
def test_weights_equal_compressed_tensors_quantization(grid):
    w = weight()
    ours = FloatWeight.quantize(w, grid, torch.float32)
    assert torch.equal(ours.dequantize(torch.float32), ct_fake_quantize(w, grid))


def test_bits_per_weight_count_every_scale():
    w = weight(256, 384)
    assert FloatWeight.quantize(w, "fp8", torch.bfloat16).bits_per_weight() == pytest.approx(8 + 16 / 384)
    assert FloatWeight.quantize(w, "fp8-block", torch.bfloat16).bits_per_weight() == pytest.approx(
        8 + 16 * 6 / w.numel()
    )
    assert FloatWeight.quantize(w, "nvfp4", torch.bfloat16).bits_per_weight() == pytest.approx(4.5 + 32 / w.numel())
    assert FloatWeight.quantize(w, "mxfp4", torch.bfloat16).bits_per_weight() == pytest.approx(4.25)


@pytest.mark.parametrize("format,preset", [("fp8", "FP8_DYNAMIC"), ("mxfp4", "MXFP4")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_activations_equal_compressed_tensors(format, preset, dtype):
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x[0, 1] = 0  # a zero token
    args = preset_name_to_scheme(preset, ["Linear"]).input_activations
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(fake_quantize_float_tokens(x, format), fake_quantize(x, scale, zero, args))


def test_nvfp4_activations_sit_on_the_grid_of_their_own_scales():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    q = fake_quantize_float_tokens(x, "nvfp4")
    args = QuantizationArgs(**preset_name_to_scheme("NVFP4", ["Linear"]).input_activations.model_dump())
    for token in range(3):  # compressed-tensors with the token's own global scale gives the same values
        global_scale = generate_gparam(x[token].amin(), x[token].amax())
        groups = x[token].reshape(-1, 16)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
        reference = fake_quantize(x[token : token + 1], scale[None], zero[None], args, global_scale)
        assert torch.equal(q[token], reference[0])


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4", "fp8"])
def test_gptq_on_float_grids_beats_rtn_on_the_output(grid):
    generator = torch.Generator().manual_seed(3)
    w = weight(64, 256)
    x = torch.randn(2048, 256, generator=generator) @ torch.randn(256, 256, generator=generator) * 0.1
    h = 2 * x.t() @ x / x.shape[0]
    result = gptq_quantize(w, h, 4, 128, True, torch.float32, grid=FLOAT_GRIDS[grid])
    rtn = FloatWeight.quantize(w, grid, torch.float32)
    assert torch.equal(result.weight.scales, rtn.scales)  # the same grid, only the rounding differs
    gptq_error = output_error(w, result.weight.dequantize(torch.float32), h)
    rtn_error = output_error(w, rtn.dequantize(torch.float32), h)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def tokens():
    return torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))


def export(source, out, **step):
    apply(Recipe.from_dict({"steps": [{"rtn": step}]}), source, out, progress=False)
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize(
    "step,dtype,format",
    [
        ({"grid": "fp8", "activation_grid": "fp8", "quantize_attention": False}, torch.float32, "float-quantized"),
        ({"grid": "fp8-block"}, torch.float32, "float-quantized"),
        ({"grid": "nvfp4"}, torch.bfloat16, "nvfp4-pack-quantized"),
        (
            {"grid": "mxfp4", "activation_grid": "mxfp4", "quantize_attention": False},
            torch.bfloat16,
            "mxfp4-pack-quantized",
        ),
    ],
)
def test_exports_load_in_transformers_with_the_logits_of_our_model(step, dtype, format, tiny_llama, tmp_path):
    """FP4 checkpoints load in bf16: compressed-tensors decompresses E2M1 weights to bf16 (fp32 models fail)."""
    config = export(tiny_llama, tmp_path / "out", **step)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == format
    x = tokens()
    ours = load_quantized_model(tmp_path / "out", dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    assert torch.equal(theirs(x).logits, ours(x).logits)
    if "activation_grid" in step:  # the activations are quantized on both sides, not dropped
        ours.model.layers[0].mlp.down_proj.quantize_inputs(None)
        assert not torch.equal(theirs(x).logits, ours(x).logits)


def test_nvfp4_w4a4_goes_to_the_native_format_and_loads_back(tiny_llama, tmp_path):
    config = export(tiny_llama, tmp_path / "out", grid="nvfp4", activation_grid="nvfp4")
    assert config["quant_method"] == "compressor" and config["format"] == "float"
    entry = config["modules"]["model.layers.0.mlp.up_proj"]
    assert entry["grid"] == "nvfp4" and entry["input_activations"]["strategy"] == "tensor_group"
    import compressor  # noqa: F401  (registers the native format with transformers)

    x = tokens()
    ours = load_quantized_model(tmp_path / "out")(x).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(x).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "step",
    [
        {"rtn": {"grid": "nvfp4"}},
        {"gptq": {"grid": "nvfp4"}},
        {"efficientqat_block_ap": {"grid": "nvfp4", "epochs": 1, "quant_lr": 1e-4}},
    ],
)
def test_nvfp4_fused_shards_share_one_weight_global_scale(step, tiny_llama, calibration_file, tmp_path):
    """vLLM serves q/k/v and gate/up as one GEMM with one global scale (the largest of the shards'): ours share
    it, so every shard dequantizes as we computed it."""
    recipe = Recipe.from_dict(
        {"calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32}, "steps": [step]}
    )
    apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    model = load_quantized_model(tmp_path / "out")
    layer = model.model.layers[0]
    attention = [getattr(layer.self_attn, p).global_scale for p in ("q_proj", "k_proj", "v_proj")]
    mlp = [getattr(layer.mlp, p).global_scale for p in ("gate_proj", "up_proj")]
    assert all(torch.equal(g, attention[0]) for g in attention) and torch.equal(mlp[0], mlp[1])
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).model.layers[0].self_attn
    amax = max(float(getattr(dense, p).weight.detach().abs().max()) for p in ("q_proj", "k_proj", "v_proj"))
    assert float(attention[0]) == pytest.approx(448 * 6 / amax, rel=1e-2)  # the largest shard's


def test_static_nvfp4_activations_equal_compressed_tensors():
    """A calibrated input_global_scale: compressed-tensors' NVFP4 preset (dynamic local block scales) with it."""
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4)) * 2
    global_scale = generate_gparam(x.amin() * 0.7, x.amax() * 0.7)  # calibrated on smaller inputs: some saturate
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=global_scale)
    reference = fake_quantize(x, scale, zero, args, global_scale=global_scale)
    assert torch.equal(fake_quantize_float_tokens(x, "nvfp4", global_scale), reference)
    assert not torch.equal(fake_quantize_float_tokens(x, "nvfp4"), reference)  # per token differs


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_w4a4_with_calibrated_global_scales_exports_compressed_tensors(
    method, tiny_llama, calibration_file, tmp_path
):
    """llm-compressor's NVFP4 form: input_global_scale per layer, loaded by transformers with our logits."""
    step = {"grid": "nvfp4", "activation_grid": "nvfp4", "activation_global_scale": "calibrated"}
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32},
            "steps": [{method: {**step, "quantize_attention": False}}],
        }
    )
    apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    inputs = config["config_groups"]["group_0"]["input_activations"]
    assert inputs["dynamic"] == "local" and inputs["strategy"] == "tensor_group"
    x = tokens()
    ours = load_quantized_model(tmp_path / "out", dtype=torch.bfloat16)
    scale = ours.model.layers[0].mlp.down_proj.input_global_scale
    assert scale.shape == (1,) and 0 < float(scale) < float("inf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(theirs.model.layers[0].mlp.down_proj.input_global_scale.float(), scale)
    assert torch.equal(ours(x).logits, theirs(x).logits)
    ours.model.layers[0].mlp.down_proj.quantize_inputs(None)  # the activations are quantized on both sides
    assert not torch.equal(theirs(x).logits, ours(x).logits)


@pytest.mark.parametrize(
    "step,key",
    [
        ({"efficientqat_block_ap": {"grid": "fp8"}}, "efficientqat_block_ap.grid"),
        ({"rtn": {"grid": "nvfp4", "bits": 3}}, "rtn.bits"),
        ({"rtn": {"activation_grid": "fp8", "activation_bits": 8}}, "rtn.activation_bits"),
        ({"qllm": {"activation_grid": "fp8"}}, "qllm.activation_grid"),
        (
            {
                "qllm": {
                    "activation_grid": "nvfp4",
                    "activation_global_scale": "calibrated",
                    "quantize_attention": False,
                }
            },
            "qllm.activation_global_scale",
        ),
        ({"qllm": {"activation_grid": "nvfp4", "weight_only": True}}, "qllm.activation_grid"),
        ({"rtn": {"activation_grid": "mxfp4", "activation_global_scale": "calibrated"}}, "rtn.activation_global_scale"),
        ({"rtn": {"activation_grid": "nvfp4", "activation_global_scale": "calibrated"}}, "rtn.activation_global_scale"),
    ],
)
def test_a_grid_a_method_cannot_use_is_refused_in_one_line(step, key):
    with pytest.raises(UserError) as error:
        Recipe.from_dict({"steps": [step]})
    message = str(error.value)
    assert key in message and "\n" not in message


def test_fp8_kv_cache_calibrates_exports_and_loads_with_equal_logits(tiny_llama, calibration_file, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32},
            "steps": [{"fp8_kv": {}}],
        }
    )
    apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache"]["method"] == "fp8"
    import compressor  # noqa: F401  (registers the native format with transformers)

    x = tokens()
    ours = load_quantized_model(tmp_path / "out")
    attention = ours.model.layers[0].self_attn
    assert float(attention.k_scale) > 0 and float(attention.v_scale) > 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(ours(x).logits, theirs(x).logits)
    from compressor import kvcache

    cached = ours(x).logits
    kvcache.remove(ours)
    assert not torch.equal(cached, ours(x).logits)  # the FP8 cache is in use, not a no-op
    assert (cached - ours(x).logits).abs().max() < 0.05 * ours(x).logits.abs().max()  # and close to exact


def test_fp8_kv_cache_beside_compressed_tensors_weights(tiny_llama, calibration_file, tmp_path):
    """kv_cache_scheme and self_attn.k_scale / v_scale, as llm-compressor writes them (vLLM's
    CompressedTensorsKVCacheMethod reads them). Our loader runs the cache. transformers 5.25 with compressed-tensors
    0.20.1 loads the weights but not the cache: compressed-tensors hooks attention modules whose forward takes
    ``past_key_values``, and transformers' Llama attention now takes ``cache`` (the scales load as unexpected keys),
    so its logits are ours without the cache."""
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 32},
            "steps": [{"rtn": {"grid": "fp8", "activation_grid": "fp8", "quantize_attention": False}}, {"fp8_kv": {}}],
        }
    )
    apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and "kv_cache" not in config
    assert config["kv_cache_scheme"]["strategy"] == "tensor" and config["kv_cache_scheme"]["type"] == "float"
    x = tokens()
    ours = load_quantized_model(tmp_path / "out")
    assert float(ours.model.layers[1].self_attn.v_scale) > 0
    with_cache = ours(x).logits
    from compressor import kvcache

    kvcache.remove(ours)
    assert not torch.equal(with_cache, ours(x).logits)  # the FP8 cache is in use
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(ours(x).logits, theirs(x).logits)


def test_a_kv_cache_compressed_tensors_cannot_hold_is_refused_in_one_line(tiny_llama, tmp_path):
    recipe = Recipe.from_dict({"steps": [{"rtn": {"grid": "fp8"}}, {"fp8_kv": {"quantize_fresh": False}}]})
    with pytest.raises(UserError) as error:
        apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert "kv_cache_scheme" in str(error.value) and "\n" not in str(error.value)


def test_gptq_w4a4_on_mxfp4_exports_compressed_tensors_and_beats_rtn_per_layer(tiny_llama, calibration_file, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 64},
            "steps": [{"gptq": {"grid": "mxfp4", "activation_grid": "mxfp4", "quantize_attention": False}}],
        }
    )
    report = apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mxfp4-pack-quantized"
    assert config["config_groups"]["group_0"]["input_activations"]["group_size"] == 32
    rows = [row for row in report.rows if row["step"] == "gptq"]
    assert len(rows) == 14 and sum(r["output_error"] for r in rows) < 0.9 * sum(r["rtn_output_error"] for r in rows)
    x = tokens()
    ours = load_quantized_model(tmp_path / "out", dtype=torch.bfloat16)(x).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)(x).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("grid,quant_lr", [("nvfp4", 1e-4), ("mxfp4", 1e-3)])  # mxfp4 trains log2 scales
def test_block_ap_trains_fp4_scales_and_weights_below_rtn(grid, quant_lr, tiny_llama, calibration_file, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 8, "seq_len": 64},
            "steps": [{"efficientqat_block_ap": {"grid": grid, "epochs": 2, "quant_lr": quant_lr, "heldout": 0}}],
        }
    )
    report = apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    blocks = [row for row in report.rows if row["module"].endswith("block_ap")]
    assert blocks and all(row["mse_final"] < row["mse_init"] for row in blocks)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["format"] == f"{grid}-pack-quantized"
    x = tokens()
    ours = load_quantized_model(tmp_path / "out", dtype=torch.bfloat16)(x).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)(x).logits
    assert torch.equal(ours, theirs)
