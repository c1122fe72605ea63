"""BFP with K-sort: the number format (grid, bounds, bit-exact round trips, MXINT8 parity), the K-sort
permutation on keys with outlier channels, the BFP KV cache in real models (exact plumbing, GQA,
generation), BFP weights through export and load, and one-line errors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor import Recipe, apply, kvcache
from compressor.errors import UserError
from compressor.export import load_quantized_model
from compressor.export.native import from_tensors, module_entry, to_tensors
from compressor.kvcache.bfp import (
    BFPCacheSpec,
    BFPLayer,
    BFPQuantizedCache,
    cache_bytes_per_token,
    pack_mantissas,
    unpack_mantissas,
)
from compressor.quant.bfp import (
    bfp_key_error,
    block_errors,
    channel_stat,
    ksort_permutation,
    query_weights,
    refine_permutation,
    weight_norm_stat,
)
from compressor.weights.values import BFPWeight, bfp_decode, bfp_encode, bfp_quantize

# ----------------------------------------------------------------------------------------------
# The format


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_grid_bounds_and_idempotence(bits, block):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits * block)) * torch.logspace(-3, 3, 96)
    mantissas, exponents = bfp_encode(x, bits, block)
    signed = mantissas.float() - 2 ** (bits - 1)
    assert signed.abs().max() <= 2 ** (bits - 1) - 1 and mantissas.min() >= 1
    restored = bfp_decode(mantissas, exponents, bits, block)
    exponent = exponents.int() - 127
    step = torch.pow(2.0, (exponent - (bits - 2)).float()).repeat_interleave(block, 1)
    assert torch.equal(restored / step, torch.round(restored / step))  # on the block's grid
    amax = x.reshape(64, -1, block).abs().amax(-1)
    assert torch.equal(exponent, torch.floor(torch.log2(amax)).int())  # E = floor(log2 max|x|)
    saturated = x.abs() >= (2 ** (bits - 1) - 0.5) * step
    assert ((x - restored).abs()[~saturated] <= step[~saturated] / 2).all()
    assert torch.equal(bfp_quantize(restored, bits, block), restored)  # idempotent, bitwise


def test_zero_blocks_short_blocks_and_nonfinite():
    x = torch.zeros(2, 40)
    x[1, 32:] = torch.tensor([1.0, -3.0, 0.5, 0, 0, 0, 0, -2.5])
    mantissas, exponents = bfp_encode(x, 4, 32)
    assert exponents.shape == (2, 2) and exponents[0].tolist() == [0, 0] and exponents[1].tolist() == [0, 128]
    restored = bfp_decode(mantissas, exponents, 4, 32)
    assert torch.isfinite(restored).all() and torch.equal(restored, x)  # these values lie on the grid
    with pytest.raises(ValueError, match="inf or NaN"):
        bfp_encode(torch.tensor([1.0, float("inf")]), 4, 32)


def test_outlier_flushes_its_block_to_zero():
    """The failure mode K-sort fixes: at 4 bits a value ~31x the others leaves them all 0."""
    x = torch.full((32,), 1.0) * torch.linspace(0.6, 1.0, 32)
    x[5] = 31.0
    restored = bfp_quantize(x, 4, 32)
    assert restored[5] == 28.0  # 1.75 * 2**4: the floor-exponent rule saturates the maximum
    assert torch.count_nonzero(restored) == 1


def mxint8_numpy(x: np.ndarray, block: int = 32) -> np.ndarray:
    """An independent MXINT8 emulation (microxcaling ``_quantize_mx``: int8 elements, emax 0, scale
    2**floor(log2 amax), round half away from zero, clamp to +-127/64)."""
    out = np.empty_like(x, dtype=np.float64)
    for start in range(0, x.shape[-1], block):
        chunk = x[..., start : start + block].astype(np.float64)
        amax = np.abs(chunk).max(-1, keepdims=True)
        shared = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))), 0)
        scaled = chunk / 2.0**shared * 64
        rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
        out[..., start : start + block] = np.clip(rounded, -127, 127) / 64 * 2.0**shared
    return out


def test_m8_block32_nearest_away_is_mxint8():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * 5
    ours = bfp_quantize(x, 8, 32, rounding="nearest_away").double().numpy()
    assert np.array_equal(ours, mxint8_numpy(x.numpy()))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_weight_round_trips_bit_exactly_through_the_codec(bits):
    weight = torch.randn(24, 72, generator=torch.Generator().manual_seed(bits))
    value = BFPWeight.quantize(weight, bits, 16)
    assert value.bits_per_weight() == bits + 8 * 5 / 72  # ceil(72 / 16) = 5 exponents per row
    back = from_tensors(to_tensors(value), json.loads(json.dumps(module_entry(value))))
    assert torch.equal(back.mantissas, value.mantissas) and torch.equal(back.exponents, value.exponents)
    assert torch.equal(back.dequantize(), value.dequantize())
    packed = pack_mantissas(value.mantissas, bits)
    assert torch.equal(unpack_mantissas(packed, bits, 72), value.mantissas)
    assert packed.shape[-1] == (36 if bits == 4 else 72)


# ----------------------------------------------------------------------------------------------
# K-sort


def keys_with_outlier_channels(tokens=512, channels=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.5 * torch.randn(channels, generator=generator))
    scales[torch.randperm(channels, generator=generator)[:4]] *= 8  # planted outlier channels
    return torch.randn(tokens, channels, generator=generator) * scales


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_ksort_lowers_the_error_on_keys_with_outlier_channels(block, seed):
    keys = keys_with_outlier_channels(seed=seed)
    perm = ksort_permutation(channel_stat(keys, "act_rms"), head_dim=128, scope="head")
    unsorted = bfp_key_error(keys, 4, block)
    sorted_ = bfp_key_error(keys, 4, block, perm)
    # each channel's error relative to its own size (plain MSE is dominated by the outlier channels,
    # whose block now holds the other outliers: it can rise, see docs/methods/bfp.md)
    assert sorted_["channel_mse"] < 0.6 * unsorted["channel_mse"]


def test_a_block_as_wide_as_the_head_gains_nothing():
    keys = keys_with_outlier_channels(channels=64)
    perm = ksort_permutation(channel_stat(keys, "act_rms"), head_dim=64, scope="head")
    assert bfp_key_error(keys, 4, 64, perm) == bfp_key_error(keys, 4, 64)


def test_permutations_are_bijections_within_heads_and_scores_are_unchanged():
    stat = torch.rand(4 * 16)
    perm = ksort_permutation(stat, head_dim=16, scope="head")
    assert perm.dtype == torch.int32 and torch.equal(perm.sort().values, torch.arange(64, dtype=torch.int32))
    assert torch.equal(perm.long() // 16, torch.arange(64) // 16)  # no channel leaves its head
    assert (stat[perm.long()].reshape(4, 16).diff(dim=1) <= 0).all()  # each head sorted, largest first
    token = ksort_permutation(stat, head_dim=16, scope="token")
    assert (stat[token.long()].diff() <= 0).all()
    q, k = torch.randint(-8, 8, (2, 64)).float()  # small integers: the dot products are exact
    assert torch.equal((q[perm.long()] * k[perm.long()]).reshape(4, 16).sum(1), (q * k).reshape(4, 16).sum(1))


def test_weight_norm_statistic_ranks_like_the_keys_of_whitened_inputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator) * torch.linspace(0.2, 3, 32).unsqueeze(1)
    keys = torch.randn(20000, 64, generator=generator) @ weight.t()
    by_weight = ksort_permutation(weight_norm_stat(weight), 32)
    by_keys = ksort_permutation(channel_stat(keys, "act_rms"), 32)
    assert (by_weight[:8].sort().values == by_keys[:8].sort().values).all()


# ----------------------------------------------------------------------------------------------
# The cache in real models


class LosslessVectors:
    """Stores the permuted vectors in fp32 unchanged: isolates the cache's permutation plumbing."""

    def __init__(self, perm):
        self.perm, self.stored = perm, None

    def append(self, flat):
        flat = flat[..., self.perm]
        self.stored = flat if self.stored is None else torch.cat([self.stored, flat], 1)

    def decode(self, channels, dtype):
        return self.stored[..., torch.argsort(self.perm)].to(dtype)


def random_perms(model, head_dim, scope, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = model.config.num_key_value_heads * head_dim
    return [ksort_permutation(torch.rand(channels, generator=generator), head_dim, scope) for _ in model.model.layers]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_cache_with_lossless_storage_is_exact_over_prefill_and_generation(arch, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    prompt = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = model.generate(
        prompt, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for scope in ("token", "head"):
        perms = random_perms(model, head_dim, scope)
        cache = BFPQuantizedCache(
            BFPCacheSpec(k_bits=4, v_bits=4, block_size=16, scope=scope), len(perms), perms, perms
        )
        for layer, perm in zip(cache.layers, perms):
            layer.lazy_initialization(torch.zeros(1, model.config.num_key_value_heads, 1, head_dim), None)
            layer._keys, layer._values = LosslessVectors(perm.long()), LosslessVectors(perm.long())
        got = model.generate(
            prompt, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True, cache=cache
        )
        assert torch.equal(got.sequences, expected.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, expected.logits)) < 1e-5


def test_installed_cache_quantizes_prefill_and_generation_and_counts_bytes(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(2))
    reference = model(prompt).logits
    spec = BFPCacheSpec(k_bits=4, block_size=16)
    kvcache.install(model, spec.to_dict())
    out = model(prompt)
    assert isinstance(out.cache, BFPQuantizedCache) and not torch.allclose(out.logits, reference, atol=1e-5)
    channels = 2 * 32  # 2 KV heads of 32 channels
    assert out.cache.nbytes()["k"] == 2 * 20 * (channels // 2 + channels // 16)  # 2 layers, nibbles + exponent bytes
    seen = []
    original_update = BFPLayer.update
    BFPLayer.update = lambda self, *a, **k: seen.append(1) or original_update(self, *a, **k)
    try:
        model.generate(prompt, max_new_tokens=4, do_sample=False)
    finally:
        BFPLayer.update = original_update
    assert len(seen) == 2 * 4  # generate's own cache was swapped: every step of both layers went through BFP
    kvcache.remove(model)
    assert torch.equal(model(prompt).logits, reference)


def test_bytes_per_token():
    sizes = cache_bytes_per_token(BFPCacheSpec(k_bits=4, block_size=32), num_layers=6, kv_heads=2, head_dim=32)
    assert sizes["k_bytes_per_token"] == 6 * (32 + 2) and sizes["dense_bytes_per_token"] == 6 * 128
    assert sizes["k_ratio"] == pytest.approx(34 / 128)


# ----------------------------------------------------------------------------------------------
# The step, export, loading


def recipe(step, samples=4, seq_len=64, **export):
    return Recipe.from_dict(
        {
            "calibration": {"dataset": "demo", "samples": samples, "seq_len": seq_len},
            "steps": [{"bfp": step}],
            "export": export,
        }
    )


def test_kv_export_records_the_permutation_and_transformers_loads_it_with_the_cache(tiny_models, tmp_path):
    import compressor  # noqa: F401  (registers the native format with transformers)

    source = tiny_models["qwen3"]
    apply(
        recipe({"k_bits": 4, "block_size": 16, "scope": "head"}, dtype="float32"),
        source,
        tmp_path / "out",
        progress=False,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache"]["k_bits"] == 4 and config["kv_cache"]["k_perm"] and config["modules"] == {}
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    prompt = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(4))
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32),
        load_quantized_model(tmp_path / "out"),
    ):
        perms = [layer.self_attn.k_perm for layer in loaded.model.layers]
        assert (
            all(torch.equal(p.long().sort().values, torch.arange(p.numel())) for p in perms)
            and perms[0].dtype == torch.int32
        )
        assert not torch.equal(perms[0], torch.arange(perms[0].numel(), dtype=torch.int32))
        out = loaded(prompt)
        assert isinstance(out.cache, BFPQuantizedCache)
        kvcache.remove(loaded)  # the weights are untouched: without the cache the logits are the original's
        torch.testing.assert_close(loaded(prompt).logits, original(prompt).logits, rtol=0, atol=1e-5)


def test_bfp_weights_export_and_load_exactly(tiny_llama, tmp_path):
    apply(
        recipe({"k_bits": None, "weight_bits": 8, "weight_block_size": 32}, dtype="float32"),
        tiny_llama,
        tmp_path / "w8",
        progress=False,
    )
    config = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "bfp" and "kv_cache" not in config
    loaded = load_quantized_model(tmp_path / "w8")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    expected = BFPWeight.quantize(original.model.layers[0].self_attn.q_proj.weight.data, 8, 32)
    assert torch.equal(q_proj.quantized_weight.mantissas, expected.mantissas)
    assert torch.equal(q_proj.quantized_weight.dequantize(), expected.dequantize())
    prompt = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    error = (loaded(prompt).logits - original(prompt).logits).abs().max() / original(prompt).logits.abs().max()
    assert 0 < error < 0.02


@pytest.mark.parametrize(
    "step, message",
    [
        ({"block_size": 48}, "block_size: 48 is not one of"),
        ({"k_bits": 3}, "k_bits: 3 is not one of"),
        ({"weight_bits": 9}, "weight_bits: 9 is not one of"),
        ({"k_bits": None}, "k_bits: both k_bits and weight_bits are null"),
        ({"ksort": "sorted"}, "ksort: 'sorted' is not one of"),
        ({"ksort": "none", "refine": "greedy"}, "refine: greedy refines a K-sort order"),
    ],
)
def test_bad_settings_are_one_line_errors(step, message):
    with pytest.raises(UserError, match=message) as error:
        recipe(step)
    assert "\n" not in str(error.value)


def test_head_scope_blocks_wider_than_the_head_and_unsupported_blocks_are_refused(tiny_llama, tmp_path):
    with pytest.raises(UserError, match=r"steps\[0\]\.bfp\.block_size: 64 does not divide head_dim 32") as error:
        apply(
            recipe({"k_bits": 4, "block_size": 64, "scope": "head", "ksort": "weight_norm"}),
            tiny_llama,
            tmp_path / "x",
            progress=False,
        )
    assert "\n" not in str(error.value) and not (tmp_path / "x").exists()


def test_a_weight_fold_needs_the_rotary_table_which_is_why_the_cache_permutes_after_rope(tiny_llama):
    """Folding a permutation into W_q/W_k rows acts before RoPE: even one that moves the rotary pairs
    (j, j + D/2) together, the same for every query head of a GQA group, gives each moved pair another
    frequency, so attention changes (an engine unaware of it would be silently wrong). With the rotary
    frequencies permuted the same way it is exact again; a permutation of the post-RoPE keys (the
    cache) needs neither."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(6))
    reference = model(prompt).logits
    head_dim, kv_heads, heads = 32, 2, 4
    sigma = torch.randperm(head_dim // 2, generator=torch.Generator().manual_seed(7))
    pi = torch.cat([sigma, sigma + head_dim // 2])  # pairs move together, first and second members keep their roles
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.k_proj.weight.copy_(
                attention.k_proj.weight[torch.cat([h * head_dim + pi for h in range(kv_heads)])]
            )
            attention.q_proj.weight.copy_(attention.q_proj.weight[torch.cat([j * head_dim + pi for j in range(heads)])])
    assert (model(prompt).logits - reference).abs().max() > 1e-2
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq[sigma]
    torch.testing.assert_close(model(prompt).logits, reference, rtol=0, atol=1e-4)


def test_an_exact_prompt_is_exact_and_what_follows_reads_the_bfp_cache(tiny_llama):
    from compressor.eval import logits_of

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(8))
    reference = model(tokens).logits
    kvcache.install(model, BFPCacheSpec(k_bits=4, block_size=16, quantize_fresh=False).to_dict())
    prompt = model(tokens[:, :20])
    torch.testing.assert_close(prompt.logits, reference[:, :20], rtol=0, atol=1e-5)  # the prompt attends to exact keys
    assert prompt.cache.nbytes()["k"] > 0  # ... while the cache stores them in BFP
    rest = model(tokens[:, 20:], cache=prompt.cache).logits
    assert (rest - reference[:, 20:]).abs().max() > 1e-4
    torch.testing.assert_close(logits_of(model, tokens), torch.cat([prompt.logits, rest], 1))  # eval's two halves


def test_an_attention_without_cached_keys_is_refused_before_any_work():
    from compressor.quant.bfp import BFP

    with pytest.raises(ValueError, match="k_bits: the BFP KV cache needs attention with a k_proj"):
        BFP().check_model({"model.layers.0.self_attn.kv_a_proj_with_mqa": None, "model.layers.0.mlp.up_proj": None})
    BFP(k_bits=None, weight_bits=8).check_model({"model.layers.0.mlp.up_proj": None})  # weights alone need no k_proj


def test_streamed_key_statistics_equal_the_statistic_of_all_keys():
    from compressor.quant.bfp import KeyRecorder

    recorder = KeyRecorder(sample_tokens=10)
    batches = [torch.randn(2, 2, 7, 16), torch.randn(1, 2, 5, 16) * 3]  # [B, H_kv, T, D]
    for batch in batches:
        recorder.update(batch, None, 0)
    keys = torch.cat([b.transpose(1, 2).reshape(-1, 32) for b in batches])
    for stat in ("act_rms", "act_absmax"):
        torch.testing.assert_close(recorder.stat(stat), channel_stat(keys, stat))
    assert torch.equal(torch.cat(recorder.sample), keys[:10])


# ----------------------------------------------------------------------------------------------
# refine: greedy


def test_query_weights_sum_a_gqa_group_and_share_each_rotary_pair():
    energy = torch.arange(2 * 2 * 4, dtype=torch.float32)  # 4 query heads of dim 4, 2 KV heads
    weights = query_weights(energy, kv_heads=2, head_dim=4)
    group = energy.reshape(2, 2, 4).sum(1)  # [kv, d]
    pair = (group[:, :2] + group[:, 2:]) / 2
    assert torch.equal(weights, torch.cat([pair, pair], 1).flatten())


@pytest.mark.parametrize("scope", ["token", "head"])
def test_greedy_refinement_lowers_the_weighted_error_and_stays_a_legal_permutation(scope):
    """Keys whose large channels barely meet the queries: sorting by magnitude puts the channels that
    matter with the large ones; swaps that lower the query-weighted error find a better order."""
    generator = torch.Generator().manual_seed(0)
    channels, head_dim, block = 128, 64, 16
    scale = torch.exp(1.5 * torch.randn(channels, generator=generator))
    keys = torch.randn(2048, channels, generator=generator) * scale
    weights = torch.where(scale > scale.median(), 0.01, 1.0)  # queries weigh the small channels
    sorted_perm = ksort_permutation(keys.square().mean(0).sqrt(), head_dim, scope)
    perm, before, after = refine_permutation(keys, weights, sorted_perm, 4, block, head_dim, scope, trials=600)
    assert torch.equal(torch.sort(perm.long()).values, torch.arange(channels))
    if scope == "head":  # every channel stays in its head
        assert torch.equal(
            perm.long().reshape(-1, head_dim) // head_dim,
            torch.arange(channels // head_dim)[:, None].expand(-1, head_dim),
        )
    assert before == pytest.approx(
        float(block_errors(keys, weights, sorted_perm, 4, block, "nearest_even").sum()), rel=1e-5
    )
    assert after == pytest.approx(float(block_errors(keys, weights, perm, 4, block, "nearest_even").sum()), rel=1e-4)
    assert after < 0.9 * before


def test_refine_step_reports_the_objective_before_and_after(tiny_llama, tmp_path):
    report = apply(
        recipe({"k_bits": 4, "block_size": 16, "refine": "greedy", "refine_trials": 50}, dtype="float32"),
        tiny_llama,
        tmp_path / "out",
        progress=False,
    )
    rows = [r for r in report.rows if "logit_error_refined" in r]
    assert rows and all(r["logit_error_refined"] <= r["logit_error_sorted"] for r in rows)
