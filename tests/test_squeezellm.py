"""SqueezeLLM: properties that fail when the k-means, the sparse split or the Fisher is wrong."""

import pytest
import torch

from compressor.quant.codebook import fisher_weighted_kmeans, kmeans_plusplus, lloyd, normalized_fisher
from compressor.quant.squeezellm import fisher_diagonal, quantize_squeezellm, sparse_mask
from compressor.quant.uniform import quantize_uniform
from compressor.testing import WholeModelContext
from compressor.weights.values import DenseAndSparseWeight, LUTWeight


def rows_of(kind: str, rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, columns, generator=generator)
    if kind == "laplace":
        uniform = torch.rand(rows, columns, generator=generator).clamp(1e-6, 1 - 1e-6)
        return -torch.sign(uniform - 0.5) * torch.log1p(-2 * (uniform - 0.5).abs())
    normal = torch.randn(4, rows, columns, generator=generator)  # Student-t with 3 degrees of freedom: heavy tails
    return normal[0] / (normal[1:].square().mean(0)).sqrt()


def fisher_of(shape, seed: int) -> torch.Tensor:
    return torch.empty(shape).exponential_(generator=torch.Generator().manual_seed(seed + 100)) ** 2


def weighted_rtn_error(weight, fisher, bits):
    """Fisher-weighted error of per-row asymmetric min-max round-to-nearest (the shared RTN math)."""
    rtn = quantize_uniform(weight, bits, -1, symmetric=False, scale_dtype=torch.float32).dequantize(torch.float32)
    return (normalized_fisher(fisher).double() * (weight - rtn).double().square()).sum(1)


def demo_rows(name: str, rows: int = 48) -> torch.Tensor:
    from safetensors import safe_open

    from compressor.demo import demo_model_dir

    with safe_open(demo_model_dir() / "model.safetensors", "pt") as f:
        return f.get_tensor(name)[:rows].float()


# ----------------------------------------------------------------------------------------------
# k-means


def test_lloyd_objective_never_increases():
    weight, fisher = rows_of("laplace", 64, 256, 0), fisher_of((64, 256), 0)
    f = normalized_fisher(fisher)
    history = []
    lloyd(weight, f, kmeans_plusplus(weight, f, 8, torch.Generator().manual_seed(0)), 50, history)
    objective = torch.stack(history)  # [steps, rows]
    assert len(history) > 3
    assert (objective[1:] <= objective[:-1] * (1 + 1e-9)).all()
    assert (objective[-1] < objective[0]).float().mean() > 0.9  # it actually improves most rows


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["gaussian", "laplace", "student-t"])
def test_kmeans_is_never_worse_than_rtn(bits, kind):
    for seed in range(3):
        weight, fisher = rows_of(kind, 32, 128, seed), fisher_of((32, 128), seed)
        rtn = weighted_rtn_error(weight, fisher, bits)
        for init in ("best", "uniform"):
            _, _, objective = fisher_weighted_kmeans(weight, fisher, bits, init=init, seed=seed)
            assert (objective <= rtn * (1 + 1e-6)).all(), (init, (objective / rtn).max())
        _, _, objective = fisher_weighted_kmeans(weight, fisher, bits, seed=seed)
        assert (objective / rtn).mean() < 0.9  # and clearly better on average


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"])
@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_beats_rtn_on_real_weight_rows(name, bits):
    weight = demo_rows(name)
    fisher = fisher_of(weight.shape, 1)
    centroids, codes, objective = fisher_weighted_kmeans(weight, fisher, bits)
    rtn = weighted_rtn_error(weight, fisher, bits)
    assert (objective <= rtn * (1 + 1e-6)).all()
    assert objective.sum() < 0.5 * rtn.sum()
    # the returned objective is the error of the returned centroids and codes
    recomputed = (
        normalized_fisher(fisher).double() * (weight - centroids.gather(1, codes.long())).double().square()
    ).sum(1)
    assert torch.allclose(objective, recomputed, rtol=1e-9)


def test_codes_are_nearest_centroids_and_centroids_sorted():
    weight, fisher = rows_of("gaussian", 16, 100, 3), fisher_of((16, 100), 3)
    centroids, codes, _ = fisher_weighted_kmeans(weight, fisher, 3)
    assert (centroids[:, 1:] >= centroids[:, :-1]).all()
    assert codes.dtype == torch.uint8 and int(codes.max()) < 8
    nearest = (weight[:, :, None] - centroids[:, None, :]).abs().min(-1).values
    chosen = (weight - centroids.gather(1, codes.long())).abs()
    assert torch.allclose(chosen, nearest, atol=1e-6)


def test_separated_clusters_are_found_exactly():
    """Eight tight, well separated groups per row: the optimum is the groups' weighted means."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.linspace(-7, 7, 8)
    members = torch.randint(0, 8, (10, 120), generator=generator)
    members[:, :8] = torch.arange(8)  # every group present
    weight = centres[members] + 0.01 * torch.randn(10, 120, generator=generator)
    fisher = fisher_of((10, 120), 0)
    centroids, codes, _ = fisher_weighted_kmeans(weight, fisher, 3, init="kmeans++")
    assert torch.equal(codes.long(), members)
    f = normalized_fisher(fisher).double()
    for row in range(10):
        for j in range(8):
            inside = members[row] == j
            expected = (f[row, inside] * weight[row, inside].double()).sum() / f[row, inside].sum()
            assert centroids[row, j].item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_sensitive_weight_is_kept_close():
    weight = rows_of("laplace", 8, 256, 4)
    order = weight.abs().argsort(1)
    target = order[:, -5]  # an extreme value, but not the largest
    fisher = torch.ones_like(weight)
    fisher[torch.arange(8), target] = 1e6
    weighted, _, _ = fisher_weighted_kmeans(weight, fisher, 3)
    plain, _, _ = fisher_weighted_kmeans(weight, torch.ones_like(weight), 3)
    value = weight[torch.arange(8), target][:, None]
    span = weight.amax(1) - weight.amin(1)
    weighted_error = (weighted - value).abs().min(1).values
    plain_error = (plain - value).abs().min(1).values
    assert (weighted_error <= 1e-3 * span).all()
    assert (weighted_error < plain_error).all()


def test_fisher_scale_does_not_matter():
    weight, fisher = rows_of("student-t", 12, 96, 5), fisher_of((12, 96), 5)
    a = fisher_weighted_kmeans(weight, fisher, 4)
    b = fisher_weighted_kmeans(weight, fisher * 2.0**-30, 4)  # exact scaling: identical result
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = fisher_weighted_kmeans(weight, fisher * 3e-7, 4)  # rounding may move a draw, never the quality
    assert torch.allclose(c[2], a[2], rtol=0.05)


def test_zero_fisher_rows_fall_back_to_unit_weights_and_seed_is_deterministic():
    weight = rows_of("gaussian", 6, 64, 6)
    fisher = fisher_of((6, 64), 6)
    fisher[2] = 0
    a = fisher_weighted_kmeans(weight, fisher, 3, seed=1)
    b = fisher_weighted_kmeans(weight, fisher, 3, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a = fisher_weighted_kmeans(weight, fisher, 3, init="uniform")
    ones = fisher_weighted_kmeans(weight[2:3], torch.ones(1, 64), 3, init="uniform")
    assert torch.isfinite(a[0]).all()
    assert a[2][2] <= weighted_rtn_error(weight[2:3], torch.ones(1, 64), 3)[0] * (1 + 1e-6)
    assert a[2][2].item() == pytest.approx(ones[2][0].item(), rel=1e-6)


def test_rows_with_few_distinct_values():
    weight = torch.tensor([[0.5, 0.5, -1.0, -1.0, 0.5, 2.0]] * 3)
    centroids, codes, objective = fisher_weighted_kmeans(weight, torch.ones_like(weight), 3)
    assert torch.equal(centroids.gather(1, codes.long()), weight)
    assert (objective == 0).all()


# ----------------------------------------------------------------------------------------------
# dense-and-sparse


def test_sparse_mask_counts_and_choice():
    weight, fisher = rows_of("laplace", 40, 250, 7), fisher_of((40, 250), 7)  # 10000 entries
    mask = sparse_mask(weight, fisher, 0.05, 0.40)
    assert int(mask.sum()) == 5 + 40
    sensitive = fisher.reshape(-1).topk(5).indices
    assert mask.reshape(-1)[sensitive].all()
    rest = weight.reshape(-1).abs().clone()
    rest[sensitive] = -1
    assert mask.reshape(-1)[rest.topk(40).indices].all()
    assert sparse_mask(weight, fisher, 0.0, 0.0) is None


@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.float16])
def test_dense_and_sparse_reconstruction(lut_dtype):
    weight, fisher = rows_of("student-t", 32, 200, 8), fisher_of((32, 200), 8)
    value = quantize_squeezellm(weight, fisher, 3, sensitive_percent=0.5, outlier_percent=2.0, lut_dtype=lut_dtype)
    assert isinstance(value, DenseAndSparseWeight) and value.base_kind == "lut"
    mask = sparse_mask(weight, fisher, 0.5, 2.0)
    assert value.outlier_col.numel() == int(mask.sum()) == round(6400 * 0.025)
    assert value.outlier_val.dtype == lut_dtype and value.lut.dtype == lut_dtype
    # at kept positions the dense code is the row's centroid nearest 0, and dense + sparse = W
    nearest_zero = value.lut.float().abs().argmin(1, keepdim=True).expand_as(mask)
    assert torch.equal(value.codes.long()[mask], nearest_zero[mask])
    rebuilt = value.dequantize(torch.float32)
    tolerance = 1e-6 if lut_dtype == torch.float32 else 1e-3
    assert torch.allclose(rebuilt[mask], weight[mask], rtol=tolerance, atol=1e-7)
    # without the rescale, the dense part holds the nearest stored centroid elsewhere
    value = quantize_squeezellm(
        weight, fisher, 3, sensitive_percent=0.5, outlier_percent=2.0, lut_dtype=lut_dtype, rescale="none"
    )
    rebuilt = value.dequantize(torch.float32)
    assert torch.allclose(rebuilt[mask], weight[mask], rtol=tolerance, atol=1e-7)
    dense = value.base.dequantize(torch.float32)
    nearest = (weight[:, :, None] - value.lut.float()[:, None, :]).abs().min(-1).values
    assert torch.allclose((weight - dense).abs()[~mask], nearest[~mask], atol=1e-6)
    # removing outliers makes the dense part easier: its error is below the dense-only value's
    dense_only = quantize_squeezellm(weight, fisher, 3, lut_dtype=lut_dtype, rescale="none")
    assert isinstance(dense_only, LUTWeight)
    assert (weight - rebuilt).square().sum() < (weight - dense_only.dequantize(torch.float32)).square().sum()


@pytest.mark.parametrize("sparse", [False, True])
def test_unbiased_rescale_keeps_codes_and_removes_the_shrinkage(sparse):
    """k-means shrinks each row (<q, w> < <w, w>); the rescale keeps the codes and makes <q, w> = <w, w>
    over the dense entries, which the sparse part then completes to W exactly."""
    weight, fisher = demo_rows("model.layers.2.mlp.down_proj.weight", 32), fisher_of((32, 768), 12)
    percents = dict(sensitive_percent=0.05, outlier_percent=0.4) if sparse else {}
    plain = quantize_squeezellm(weight, fisher, 3, lut_dtype=torch.float32, rescale="none", **percents)
    scaled = quantize_squeezellm(weight, fisher, 3, lut_dtype=torch.float32, **percents)
    assert torch.equal(plain.codes, scaled.codes)
    mask = sparse_mask(weight, fisher, **percents) if sparse else torch.zeros_like(weight, dtype=torch.bool)
    dense = weight.masked_fill(mask, 0.0).double()
    energy = dense.square().sum(1)
    before = (plain.lut.double().gather(1, plain.codes.long()) * dense).sum(1)
    after = (scaled.lut.double().gather(1, scaled.codes.long()) * dense).sum(1)
    assert (before < energy).all()  # the bias: every row shrinks
    assert torch.allclose(after, energy, rtol=1e-5)
    alpha = scaled.lut.double() / plain.lut.double()
    assert torch.allclose(alpha, alpha[:, :1].expand_as(alpha), rtol=1e-5) and (alpha > 1).all()
    if sparse:
        assert torch.allclose(scaled.dequantize(torch.float32)[mask], weight[mask], rtol=1e-6, atol=1e-7)
    else:  # the scale costs a little weighted error: still far below per-row RTN's on every row
        scaled_error = (
            normalized_fisher(fisher).double() * (weight - scaled.dequantize(torch.float32)).double().square()
        ).sum(1)
        assert (scaled_error < 0.8 * weighted_rtn_error(weight, fisher, 3)).all()


def test_everything_kept_is_exact():
    weight, fisher = rows_of("gaussian", 8, 64, 9), fisher_of((8, 64), 9)
    value = quantize_squeezellm(weight, fisher, 2, sensitive_percent=100.0, lut_dtype=torch.float32)
    assert value.outlier_col.numel() == weight.numel()
    assert torch.allclose(value.dequantize(torch.float32), weight, rtol=1e-6, atol=1e-7)


def test_removed_entries_do_not_pull_centroids():
    """Zero-weighted zeros at the removed positions == the row with those entries deleted."""
    weight, fisher = rows_of("laplace", 4, 120, 10), fisher_of((4, 120), 10)
    mask = sparse_mask(weight, fisher, 0.0, 5.0)  # 6 entries
    masked_centroids, _, _ = fisher_weighted_kmeans(
        weight.masked_fill(mask, 0), fisher.masked_fill(mask, 0), 3, init="uniform"
    )
    for row in range(4):
        keep = ~mask[row]
        deleted, _, _ = fisher_weighted_kmeans(weight[row, keep][None], fisher[row, keep][None], 3, init="uniform")
        if mask[row].any():  # min-max ranges always include 0, so both start from the same grid
            assert torch.allclose(masked_centroids[row], deleted[0], atol=1e-6)


def test_value_bits_per_weight():
    weight, fisher = rows_of("gaussian", 64, 256, 11), fisher_of((64, 256), 11)
    assert quantize_squeezellm(weight, fisher, 3).bits_per_weight() == pytest.approx(3 + 16 * 8 / 256)
    value = quantize_squeezellm(weight, fisher, 4, sensitive_percent=0.05, outlier_percent=0.40)
    nnz = round(64 * 256 * 0.0045)
    assert value.bits_per_weight() == pytest.approx(4 + 16 * 16 / 256 + (nnz * 48 + 32 * 65) / (64 * 256))


# ----------------------------------------------------------------------------------------------
# Fisher


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def test_fisher_is_the_sum_of_per_sample_squared_gradients():
    model = tiny_model()
    tokens = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    modules = {"q": model.model.layers[0].self_attn.q_proj, "down": model.model.layers[1].mlp.down_proj}
    fisher = fisher_diagonal(WholeModelContext(model), modules, tokens, torch.device("cpu"))
    assert all(not m.weight.requires_grad and m.weight.grad is None for m in modules.values())

    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    per_sample = {name: torch.zeros_like(m.weight) for name, m in modules.items()}
    batch_sum = {name: torch.zeros_like(m.weight) for name, m in modules.items()}
    for sample in tokens.split(1):
        grads = torch.autograd.grad(model(input_ids=sample, labels=sample).loss, weights)
        for name, grad in zip(modules, grads):
            per_sample[name] += grad.square()
            batch_sum[name] += grad
    for name in modules:
        assert torch.allclose(fisher[name], per_sample[name], rtol=1e-5, atol=1e-12)
        assert not torch.allclose(
            fisher[name], batch_sum[name].square(), rtol=1e-2
        )  # squaring a batch gradient is wrong
        assert (fisher[name] >= 0).all() and fisher[name].dtype == torch.float32


def test_bfloat16_fisher_accumulators_stay_close_to_fp32():
    model = tiny_model(2)
    tokens = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    modules = {"o": model.model.layers[0].self_attn.o_proj, "up": model.model.layers[1].mlp.up_proj}
    exact = fisher_diagonal(WholeModelContext(model), modules, tokens, torch.device("cpu"))
    half = fisher_diagonal(WholeModelContext(model), modules, tokens, torch.device("cpu"), torch.bfloat16)
    for name in modules:
        assert half[name].dtype == torch.bfloat16
        # six roundings of 2**-9 each at most
        assert torch.allclose(half[name].float(), exact[name], rtol=6 * 2**-8, atol=0)
        assert not torch.equal(half[name].float(), exact[name])


def test_fisher_is_zero_where_the_loss_does_not_depend_on_a_weight():
    model = tiny_model(1)
    mlp = model.model.layers[0].mlp
    mlp.down_proj.weight.data[:, 7] = 0  # intermediate channel 7 is never read
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    fisher = fisher_diagonal(
        WholeModelContext(model), {"gate": mlp.gate_proj, "up": mlp.up_proj}, tokens, torch.device("cpu")
    )
    for name in ("gate", "up"):
        assert torch.equal(fisher[name][7], torch.zeros(64))
        assert (fisher[name].sum(1) > 0).sum() == 95


def test_fisher_through_the_blockwise_runner_equals_plain_autograd(tiny_llama):
    """Block-level recomputation (and offloading) fires each weight's hook once per sample."""
    from transformers import AutoModelForCausalLM

    from compressor.blockwise import BlockwiseModel
    from compressor.model import ModelHandle

    handle = ModelHandle.open(tiny_llama)
    handle.materialize_all("cpu", torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    tokens = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(2))
    expected = fisher_diagonal(
        WholeModelContext(reference), {n: reference.get_submodule(n) for n in names}, tokens, torch.device("cpu")
    )
    got = fisher_diagonal(
        BlockwiseModel(handle, "cpu", offloaded=True),
        {n: handle.model.get_submodule(n) for n in names},
        tokens,
        torch.device("cpu"),
    )
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# recipe, export, loading


def test_recipe_mistakes_are_one_line_errors():
    from compressor import Recipe, RecipeError

    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.bits: 9 is not one of 2\.\.8"):
        Recipe.from_dict({"steps": [{"squeezellm": {"bits": 9}}]})
    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.outlier_percent: .*exceeds 100"):
        Recipe.from_dict({"steps": [{"squeezellm": {"sensitive_percent": 60, "outlier_percent": 50}}]})
    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.init: 'random' is not one of"):
        Recipe.from_dict({"steps": [{"squeezellm": {"init": "random"}}]})
    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.rescale: 'yes' is not one of"):
        Recipe.from_dict({"steps": [{"squeezellm": {"rescale": "yes"}}]})
    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.fisher_passes: 0 "):
        Recipe.from_dict({"steps": [{"squeezellm": {"fisher_passes": 0}}]})
    with pytest.raises(RecipeError, match=r"steps\[0\]\.squeezellm\.fisher_dtype: 'float16' is not one of"):
        Recipe.from_dict({"steps": [{"squeezellm": {"fisher_dtype": "float16"}}]})


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sparse", [False, True])
def test_native_tensors_round_trip(bits, sparse):
    from compressor.export import native

    weight, fisher = rows_of("laplace", 37, 100, bits), fisher_of((37, 100), bits)  # odd N, K not a multiple of 32
    value = quantize_squeezellm(weight, fisher, bits, outlier_percent=1.0 if sparse else 0.0, iterations=5)
    tensors = native.to_tensors(value)
    entry = native.module_entry(value)
    assert tensors["weight_packed"].dtype == torch.int32 and tensors["weight_packed"].shape == (37, 128 * bits // 32)
    assert tensors["weight_lut"].shape == (37, 2**bits) and tensors["weight_lut"].dtype == torch.float16
    assert ("weight_outlier_val" in tensors) == sparse and entry["outliers"] == (37 if sparse else 0)
    back = native.from_tensors(tensors, entry)
    assert type(back) is type(value) and torch.equal(back.codes, value.codes)
    assert torch.equal(back.dequantize(torch.float32), value.dequantize(torch.float32))
    with pytest.raises(ValueError, match="weight_lut has shape"):
        native.from_tensors({**tensors, "weight_lut": tensors["weight_lut"][:, :1]}, entry)


def test_export_loads_in_transformers_with_the_reference_logits(tiny_llama, calibration_file, tmp_path):
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from compressor import Recipe, apply
    from compressor.export import load_quantized_model
    from compressor.modules.linear import QuantizedLinear, dequantize_model_
    from compressor.validate import validate_model

    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 3, "seq_len": 32},
            "steps": [{"squeezellm": {"bits": 3, "sensitive_percent": 0.05, "outlier_percent": 0.4, "iterations": 10}}],
        }
    )
    out = tmp_path / "out"
    report = apply(recipe, tiny_llama, out, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressor" and config["format"] == "lut" and config["outliers"] is True
    assert config["ignore"] == ["lm_head"] and len(config["modules"]) == 14
    assert config["modules"]["model.layers.1.mlp.down_proj"] == {
        "kind": "lut",
        "bits": 3,
        "outliers": round(128 * 384 * 0.0005) + round(128 * 384 * 0.004),
    }
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_lut").dtype == torch.float16
    assert (
        "model.layers.0.self_attn.q_proj.weight" not in names
        and "model.layers.0.self_attn.q_proj.weight_outlier_crow" in names
    )
    fisher_row = next(row for row in report.rows if row["module"] == "fisher")
    assert fisher_row["samples"] == 3 and fisher_row["peak_rss_gib"] > 0

    x = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantizedLinear)
    ours = load_quantized_model(out)
    reference = load_quantized_model(out)
    assert dequantize_model_(reference, torch.float32) == 14
    with torch.no_grad():
        expected = reference(x).logits
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-5, atol=1e-5)
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(x).logits
    assert not torch.allclose(original, expected, atol=1e-3)  # it was quantized
    dense = loaded.dequantize()
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    torch.testing.assert_close(dense(x).logits, expected, rtol=1e-5, atol=1e-5)

    # compressor validate: the LUT + sparse kernels against the fp32 reference, layer by layer
    result = validate_model(ours, None, max_layers=3, batches=(1, 5))
    assert result["ok"] and [row["kind"] for row in result["layers"]] == ["dense_and_sparse"] * 3


@pytest.mark.parametrize("offload", [False, True])
def test_fisher_in_several_passes_gives_the_one_pass_checkpoint(tiny_llama, calibration_file, tmp_path, offload):
    """Each pass accumulates one group of blocks on the fp model; the checkpoint is byte-identical."""
    from safetensors.torch import load_file

    from compressor import Recipe, apply

    def run(passes):
        recipe = Recipe.from_dict(
            {
                "calibration": {"dataset": calibration_file, "samples": 3, "seq_len": 32},
                "steps": [
                    {"squeezellm": {"bits": 3, "iterations": 10, "fisher_passes": passes, "outlier_percent": 0.5}}
                ],
            }
        )
        report = apply(recipe, tiny_llama, tmp_path / f"out{passes}", progress=False, offload=offload)
        return report, load_file(tmp_path / f"out{passes}" / "model.safetensors")

    one_report, one = run(1)
    two_report, two = run(2)
    _, many = run(9)  # more passes than blocks: one per block
    assert [row["blocks"] for row in two_report.rows if row["module"] == "fisher"] == ["0..0", "1..1"]
    assert [row["blocks"] for row in one_report.rows if row["module"] == "fisher"] == ["0..1"]
    assert one.keys() == two.keys() == many.keys()
    for name in one:
        assert torch.equal(one[name], two[name]) and torch.equal(one[name], many[name]), name


def test_accumulators_that_do_not_fit_fail_before_the_fisher_with_the_passes_to_set(
    tiny_llama, calibration_file, tmp_path, monkeypatch
):
    import compressor.report
    from compressor import Recipe, apply

    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 16},
            "steps": [{"squeezellm": {"bits": 3, "iterations": 2}}],
        }
    )
    one_block = 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 384 * 128)  # fp32 accumulators of q, o, k, v, gate, up, down
    monkeypatch.setattr(compressor.report, "free_memory", lambda device: int(1.5 * one_block))
    with pytest.raises(
        ValueError,
        match=r"<recipe>: steps\[0\]\.squeezellm\.fisher_passes: one Fisher pass needs .* set fisher_passes: 2",
    ):
        apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(compressor.report, "free_memory", lambda device: one_block // 2)
    with pytest.raises(ValueError, match=r"no split fits: use fisher_dtype: bfloat16"):
        apply(recipe, tiny_llama, tmp_path / "out", progress=False)


def test_codebooks_are_exported_in_the_dtype_they_were_quantized_to():
    """A later model step casts the session's blocks to the compute dtype (fp32 codebooks while
    E2E-QP trains them); export writes them back in fp16, as bits_per_weight counts them."""
    from compressor.modules.linear import QuantizedLinear

    weight, fisher = rows_of("gaussian", 8, 64, 13), fisher_of((8, 64), 13)
    module = QuantizedLinear(quantize_squeezellm(weight, fisher, 3, outlier_percent=2.0, iterations=3)).to(
        torch.float32
    )
    assert module.lut.dtype == torch.float32
    stored = module.stored_weight
    assert stored.lut.dtype == stored.outlier_val.dtype == torch.float16 and stored.codes.dtype == torch.uint8
    assert torch.equal(stored.lut, module.lut.half())


def test_uniform_and_lut_weights_cannot_share_a_native_checkpoint(tmp_path):
    from torch import nn

    from compressor.export import ExportError
    from compressor.export.checkpoint import CheckpointWriter
    from compressor.modules.linear import QuantizedLinear
    from compressor.recipe import ExportConfig

    weight, fisher = rows_of("gaussian", 8, 64, 12), fisher_of((8, 64), 12)
    block = nn.Module()
    block.a = QuantizedLinear(quantize_uniform(weight, 4, 32, True, torch.float16))
    block.b = QuantizedLinear(quantize_squeezellm(weight, fisher, 4, iterations=3))
    with pytest.raises(
        ExportError,
        match=r"block\.b: 'lut' weights \(compressor\) cannot share one checkpoint with the compressed-tensors weights",
    ):
        CheckpointWriter(tmp_path, ExportConfig(), torch.float16).write_module("block", block)
    with pytest.raises(
        ExportError, match=r"block\.a: no checkpoint format for 'uniform' weights in export format 'compressor'"
    ):
        CheckpointWriter(tmp_path, ExportConfig(format="compressor"), torch.float16).write_module("block", block)


# ----------------------------------------------------------------------------------------------
# Quality on the demo model (mean KL from fp; its perplexity gap is dominated by a first-order
# term there, see benchmarks/squeezellm_ablation.py)


@pytest.fixture(scope="module")
def demo_setup():
    from compressor.calibration import calibration_tokens
    from compressor.eval import heldout_stream, load_causal_lm, make_windows
    from compressor.recipe import CalibrationConfig

    base, tokenizer = load_causal_lm("demo")
    model, _ = load_causal_lm("demo")
    model.requires_grad_(False)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in projections}
    tokens = calibration_tokens(tokenizer, CalibrationConfig(dataset="demo", samples=16, seq_len=256, seed=0))
    fisher = fisher_diagonal(WholeModelContext(model), modules, tokens, torch.device("cpu"))
    windows = make_windows(heldout_stream(tokenizer), 512, 4)
    return base, model, modules, fisher, windows


def demo_kl(demo_setup, quantize) -> float:
    from compressor.eval import evaluate

    base, model, modules, fisher, windows = demo_setup
    original = {name: m.weight.data for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.weight.data = quantize(original[name], fisher[name]).dequantize(torch.float32)
        return evaluate(model, windows, base).kl_divergence
    finally:
        for name, m in modules.items():
            m.weight.data = original[name]


def test_on_the_demo_model_squeezellm_beats_rtn_and_the_rescale_helps(demo_setup):
    """4 bits: below 0.8x RTN g128's KL (measured 0.69x here); 3 bits: the unbiased rescale below 0.85x
    the plain k-means KL (measured 0.64x here, 0.63x over three seeds in the ablation benchmark).
    k-means runs 10 iterations instead of the step's 50, a quarter of the time for the same ratios
    (50 iterations: 0.68x and 0.65x)."""

    def rtn(bits, group_size):
        return lambda w, f: quantize_uniform(w, bits, group_size, symmetric=False, scale_dtype=torch.float16)

    def squeeze(bits, rescale):
        return lambda w, f: quantize_squeezellm(w, f, bits, rescale=rescale, iterations=10)

    assert demo_kl(demo_setup, squeeze(4, "unbiased")) < 0.8 * demo_kl(demo_setup, rtn(4, 128))
    assert demo_kl(demo_setup, squeeze(3, "unbiased")) < 0.85 * demo_kl(demo_setup, squeeze(3, "none"))
