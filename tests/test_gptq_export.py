"""The GPTQ export format: its tensors decode, by the layout's own rule, to the weights we quantized;
it loads through our loader, through transformers (when optimum and gptqmodel are installed), and
``compressor check`` says which engine serves it."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor import Recipe, apply
from compressor.errors import StepError
from compressor.export import ExportError, gptq, load_quantized_model
from compressor.quant.uniform import quantize_uniform
from compressor.serving import gptq_stack_installed, verdicts


def reference_unpack(packed: torch.Tensor, bits: int, values: int, dim: int) -> torch.Tensor:
    """GPTQ's documented word layout, decoded without our packing code: along ``dim`` every run of
    32 values is a little-endian bit stream over ``bits`` int32 words, value i at bits
    [i*bits, i*bits + bits). At 2/4/8 bits that is ModelCloud/GPTQModel
    gptqmodel/nn_modules/qlinear/__init__.py ``PackableQuantLinear.dequantize_weight`` (shift by
    ``range(0, 32, bits)``, mask ``2**bits - 1``); at 3 bits its 3-word branch (values 10 and 21
    straddle words), written out in ``pack_original``'s loops (gptqmodel 5.8.0, lines 1046-1075)."""
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # unsigned words
    out = torch.zeros(*words.shape[:-1], values, dtype=torch.int64)
    for i in range(values):
        bit = i * bits
        word, shift = divmod(bit, 32)
        value = words[..., word] >> shift
        if shift + bits > 32:  # straddles into the next word
            value = value | (words[..., word + 1] << (32 - shift))
        out[..., i] = value & (2**bits - 1)
    return out.movedim(-1, dim)


@pytest.mark.parametrize("bits", gptq.BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_written_tensors_decode_to_our_weights_by_the_layouts_rule(bits, symmetric):
    n, k, group = 96, 128, 32
    weight = quantize_uniform(
        torch.randn(n, k, generator=torch.Generator().manual_seed(bits)), bits, group, symmetric, torch.float16
    )
    if not symmetric:
        weight.zeros[0, 0] = 0  # a zero point of 0, which v1 cannot hold
    tensors = gptq.to_tensors(weight, torch.float16)
    assert tensors["qweight"].shape == (k * bits // 32, n) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (k // group, n * bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (k // group, n)
    assert tensors["g_idx"].tolist() == [i // group for i in range(k)]

    codes = reference_unpack(tensors["qweight"], bits, k, dim=0)  # [K, N]
    stored_zeros = reference_unpack(tensors["qzeros"], bits, n, dim=1)  # [G, N]
    checkpoint_format = gptq.checkpoint_format_for(weight)
    assert checkpoint_format == ("gptq" if symmetric else "gptq_v2")
    zeros = stored_zeros + (1 if checkpoint_format == "gptq" else 0)  # v1 stores zero - 1
    g = tensors["g_idx"].long()
    decoded = tensors["scales"].float()[g] * (codes.float() - zeros.float()[g])  # [K, N]
    assert torch.equal(codes.t(), weight.codes.long())
    assert torch.equal(zeros.t(), weight.zero_points().long())
    assert torch.equal(decoded.t(), weight.dequantize(torch.float32))
    back = gptq.from_gptq_tensors(tensors, bits, group, symmetric, checkpoint_format)
    assert torch.equal(back.dequantize(torch.float32), weight.dequantize(torch.float32))


def test_symmetric_zero_points_are_stored_minus_one():
    weight = quantize_uniform(torch.randn(32, 64), 4, 32, True, torch.float16)
    qzeros = gptq.to_tensors(weight, torch.float16)["qzeros"]
    assert (qzeros == 0x77777777).all()  # eight 4-bit zero points of 8, each stored as 7 (AutoGPTQ's v1)


def test_shapes_that_do_not_pack_are_not_supported():
    assert gptq.shape_problem(
        quantize_uniform(torch.randn(32, 48), 3, -1, False, torch.float16)
    )  # K not a multiple of 32
    assert gptq.shape_problem(quantize_uniform(torch.randn(32, 64), 5, 32, True, torch.float16))  # no 5-bit GPTQ
    assert gptq.shape_problem(quantize_uniform(torch.randn(32, 64), 4, 32, True, torch.float16)) is None


def rtn(bits, group_size=32, symmetric=True, **export):
    return Recipe.from_dict(
        {"steps": [{"rtn": {"bits": bits, "group_size": group_size, "symmetric": symmetric}}], "export": export}
    )


def tokens(vocab=320):
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(0))


def test_auto_writes_asymmetric_sub_4_bit_weights_as_gptq_and_they_load_through_ours(tiny_llama, tmp_path):
    apply(rtn(3, 32, symmetric=False), tiny_llama, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 3 and config["sym"] is False
    assert config["group_size"] == 32 and config["desc_act"] is False and config["checkpoint_format"] == "gptq_v2"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {
        "model.layers.0.mlp.down_proj.qweight",
        "model.layers.0.mlp.down_proj.qzeros",
        "model.layers.0.mlp.down_proj.scales",
        "model.layers.0.mlp.down_proj.g_idx",
    } <= names
    assert "model.layers.0.mlp.down_proj.weight" not in names
    model = load_quantized_model(tmp_path / "out")
    assert model.model.layers[0].mlp.down_proj.quantized_weight.zeros is not None

    apply(
        rtn(4, 32, symmetric=False), tiny_llama, tmp_path / "w4", progress=False
    )  # vLLM serves these from compressed-tensors
    assert (
        json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "compressed-tensors"
    )


def test_bad_gptq_exports_are_refused_in_one_line(tiny_llama, tmp_path):
    with pytest.raises(StepError, match=r"steps\[0\]\.rtn\.bits: 5-bit weights have no GPTQ layout"):  # before any work
        apply(rtn(5, 32, format="gptq"), tiny_llama, tmp_path / "w5", progress=False)
    lut = Recipe.from_dict(
        {
            "calibration": {"dataset": "demo", "samples": 2, "seq_len": 32},
            "steps": [{"squeezellm": {"bits": 3}}],
            "export": {"format": "gptq"},
        }
    )
    with pytest.raises(StepError, match="squeezellm makes non-uniform weights, which GPTQ cannot hold"):
        apply(lut, tiny_llama, tmp_path / "lut", progress=False)
    mixed = Recipe.from_dict(
        {
            "steps": [
                {"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "*self_attn*"]}},
                {"rtn": {"bits": 4, "group_size": 32, "symmetric": False, "ignore": ["lm_head", "*mlp*"]}},
            ],
            "export": {"format": "gptq"},
        }
    )
    with pytest.raises(StepError, match=r"steps\[0\]\.rtn\.symmetric: True, and rtn's is False: a GPTQ config has one"):
        apply(mixed, tiny_llama, tmp_path / "mixed", progress=False)
    split = Recipe.from_dict(  # q_proj at 8 bits, k_proj and v_proj at 4: vLLM's qkv_proj takes one scheme
        {
            "steps": [
                {"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "*q_proj"]}},
                {"rtn": {"bits": 8, "group_size": 32, "ignore": ["lm_head", "*[!q]_proj"]}},
            ],
            "export": {"format": "gptq"},
        }
    )
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.qkv_proj: vLLM serves .* as one layer"):
        apply(split, tiny_llama, tmp_path / "split", progress=False)
    assert not any((tmp_path / name).exists() for name in ("w5", "mixed", "split"))


def test_the_serving_check_knows_gptq():
    def by_engine(config):
        return {v.engine: v for v in verdicts({"model_type": "llama", "quantization_config": config})}

    sym4 = by_engine({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "checkpoint_format": "gptq"})
    assert sym4["vllm"].loads and "Marlin" in sym4["vllm"].how
    assert sym4["transformers"].loads == gptq_stack_installed() and "gptqmodel" in sym4["transformers"].line()
    asym3 = by_engine(
        {"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}
    )
    assert not asym3["vllm"].loads and "#38288" in asym3["vllm"].how
    assert asym3["transformers"].loads == gptq_stack_installed()
