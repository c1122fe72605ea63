"""BFP weights through the Triton kernels (interpreter on the CPU): the kernel layout is the uniform
one with power-of-two group scales, so its reference decode and every schedule must reproduce the
value type's own dequantization on awkward shapes, block sizes and widths."""

import pytest
import torch

from compressor.kernels import dequantize, exact_linear, triton_linear, use_backend
from compressor.kernels.packing import KERNEL_LAYOUTS, pack_bfp
from compressor.kernels.reference import dequantize_uniform
from compressor.weights.values import BFPWeight


@pytest.mark.parametrize(
    "bits, block, n, k", [(8, 32, 48, 96), (4, 16, 40, 72), (5, 128, 24, 200), (6, 8, 33, 50), (7, 64, 17, 130)]
)
def test_bfp_weights_through_the_kernels_match_the_reference(bits, block, n, k):
    generator = torch.Generator().manual_seed(bits * block + n)
    weight = BFPWeight.quantize(torch.randn(n, k, generator=generator) * torch.logspace(-3, 2, k), bits, block)
    weight.exponents[0, 0] = 0  # an all-zero block
    weight.mantissas[0, :block] = 2 ** (bits - 1)
    assert "bfp" in KERNEL_LAYOUTS
    assert torch.equal(dequantize_uniform(pack_bfp(weight)), weight.dequantize())  # the layout decodes bit-exactly
    with use_backend("triton"):
        assert torch.equal(dequantize(weight, torch.float32), weight.dequantize())
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=generator)
        expected = exact_linear(x, weight)
        got = triton_linear(x, weight)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()  # validate's fp32 tolerance: summation order


def test_validate_covers_bfp_weights_and_a_bfp_kv_cache(tmp_path):
    """``compressor validate`` on a BFP export: every BFP layer through the kernels, perplexity through
    both paths (with the export's BFP KV cache installed)."""
    import json

    from compressor import Recipe, apply
    from compressor.testing import make_random_model
    from compressor.validate import _main

    source = make_random_model(
        "llama",
        tmp_path / "source",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    recipe = Recipe.from_dict(
        {
            "steps": [
                {
                    "bfp": {
                        "k_bits": 4,
                        "block_size": 16,
                        "ksort": "weight_norm",
                        "weight_bits": 6,
                        "weight_block_size": 16,
                    }
                }
            ],
            "export": {},
        }
    )
    apply(recipe, source, tmp_path / "bfp", progress=False)
    out = tmp_path / "result.json"
    _main([str(tmp_path / "bfp"), "--json", str(out), "--options", json.dumps({"seq_len": 24, "max_windows": 1})])
    result = json.loads(out.read_text())
    assert result["ok"] and len(result["layers"]) == 7
    assert all(row["kind"] == "bfp" and row["bits"] == 6 and row["max_rel"] < 1e-4 for row in result["layers"])
    assert result["perplexity"]["ok"]
