"""The rotate step (QuaRot): Hadamard math, exactness of the rotated model, composition with W+A
quantizers, export and load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import Recipe
from compressor.export import CheckpointWriter, load_quantized_model
from compressor.model import ModelHandle
from compressor.modules.activations import fake_quantize_tokens
from compressor.modules.hadamard import (
    OnlineHadamardMLP,
    dense_hadamard,
    hadamard_factor,
    hadamard_transform,
    paley,
)
from compressor.pipeline import Session
from compressor.quant.rotate import residual_rotation
from compressor.serving import check_checkpoint
from compressor.testing import make_random_model


@pytest.mark.parametrize("q", [3, 7, 11, 19, 43])
def test_paley_matrices_are_hadamard(q):
    h = paley(q).long()
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.t(), (q + 1) * torch.eye(q + 1, dtype=torch.long))


@pytest.mark.parametrize("n", [1, 8, 12, 96, 384, 768, 1000, 86])
def test_fast_transform_equals_the_dense_orthogonal_matrix(n):
    t = dense_hadamard(n)
    torch.testing.assert_close(t @ t.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x, hadamard_factor(n)), x @ t, rtol=0, atol=1e-12)


def test_factors_are_small_hadamards_or_identity():
    assert hadamard_factor(768).shape == (12, 12) and hadamard_factor(1024).shape == (1, 1)
    assert torch.equal(hadamard_factor(11008), torch.eye(43, dtype=torch.int8))  # no Paley order <= 256 fits 11008
    rotation = residual_rotation(384, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(384, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rotation_flattens_an_outlier_channel():
    """The point of it: a token with one 100x channel quantizes at 4 bits far better once rotated."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 100
    rotated = x @ residual_rotation(256, torch.Generator().manual_seed(2)).float()
    error = (fake_quantize_tokens(x, 4) - x).square().mean()
    rotated_error = (fake_quantize_tokens(rotated, 4) - rotated).square().mean()
    assert rotated_error * 5 < error


def session_of(path, steps, calibration_file=None):
    data = {"steps": steps, "export": {"format": "auto"}}
    if calibration_file is not None:
        data["calibration"] = {"dataset": calibration_file, "samples": 4, "seq_len": 32, "seed": 0}
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Session(ModelHandle.open(path), Recipe.from_dict(data), tokenizer, progress=False, batch_size=4)


def materialized(session):
    handle = session.handle
    for name in handle.outside_block_modules():
        handle.materialize(name, "cpu", torch.float32)
    return handle.model.eval()


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotated_model_computes_the_same_logits(tmp_path, architecture, tied):
    path = make_random_model(architecture, tmp_path / "model", tie_word_embeddings=tied)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(3))
    session = session_of(path, [{"rotate": {}}])
    session.run_model_step(session.recipe.steps[0])  # (a recipe of rotate alone is refused: nothing exports it)
    model = materialized(session)
    assert isinstance(model.model.layers[0].mlp, OnlineHadamardMLP)
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)
    assert not torch.allclose(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)


def test_rotate_then_rtn_w4a4_beats_rtn_and_round_trips_through_export(tmp_path, calibration_file):
    """A model with a planted massive activation channel: rotated, RTN W4A4's logits come far closer to
    the original's; the export (online Hadamard declared) loads back to the same logits in our loader and
    in transformers."""
    path = make_random_model("llama", tmp_path / "model", hidden_size=128, intermediate_size=384)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[[5, 77]] *= 30
            block.post_attention_layernorm.weight[[9, 60]] *= 30
    model.save_pretrained(path)
    original = model.eval()
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = original(ids).logits.log_softmax(-1)

    def kl(logits):
        return float((reference.exp() * (reference - logits.log_softmax(-1))).sum(-1).mean())

    rtn = {"rtn": {"bits": 4, "group_size": -1, "symmetric": False, "activation_bits": 4}}
    plain = session_of(path, [rtn])
    plain.run()
    with torch.no_grad():
        plain_kl = kl(materialized(plain)(ids).logits)
    session = session_of(path, [{"rotate": {}}, rtn])
    session.run()
    in_memory_model = materialized(session)
    with torch.no_grad():
        in_memory = in_memory_model(ids).logits
    assert kl(in_memory) * 2 < plain_kl

    handle = session.handle
    (tmp_path / "out").mkdir()
    writer = CheckpointWriter(tmp_path / "out", session.recipe.export, torch.float32)
    for index in range(len(handle.blocks)):
        writer.write_module(handle.block_prefix(index), handle.blocks[index])
    writer.finish(handle, session.recipe, session.report)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["online_hadamard"] == {f"model.layers.{i}.mlp": 12 for i in range(2)}
    says = {(v.engine, v.part.split(" (")[0]): v.loads for v in check_checkpoint(tmp_path / "out")}
    assert says[("vllm", "online Hadamard before down_proj")] is False
    assert says[("transformers", "online Hadamard before down_proj")] is True
    ours = load_quantized_model(tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, in_memory, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(ids).logits, in_memory, rtol=1e-4, atol=1e-4)


def test_rotate_then_gptq_w4a4_runs_and_quantizes_inputs(tmp_path, calibration_file):
    path = make_random_model("qwen2", tmp_path / "model")
    gptq = {"gptq": {"bits": 4, "group_size": -1, "symmetric": False, "activation_bits": 4}}
    session = session_of(path, [{"rotate": {}}, gptq], calibration_file)
    session.run()
    down = session.handle.blocks[0].mlp.down_proj
    assert down.input_activations is not None and down.input_activations.bits == 4
    assert session.handle.blocks[0].self_attn.activation_quantization.bits == 4


@pytest.mark.parametrize(
    "steps, export",
    [
        ([{"rotate": {}}, {"rtn": {"bits": 4, "activation_bits": 4}}], "dense"),
        ([{"rotate": {}}, {"rtn": {"bits": 4}}], "auto"),
        ([{"rotate": {}}], "auto"),
    ],
)
def test_online_hadamard_without_a_native_w_a_export_is_refused_before_any_work(tiny_llama, steps, export):
    from compressor.errors import UserError

    chosen = Recipe.from_dict({"steps": steps, "export": {"format": export}})
    session = Session(ModelHandle.open(tiny_llama), chosen, None, progress=False)
    with pytest.raises(UserError, match=r"steps\[0\]\.rotate\.online_hadamard: .*native format"):
        session.run()
    assert not session.live_blocks  # nothing was loaded


def test_without_online_hadamard_the_rotated_model_is_a_stock_one(tiny_llama, tmp_path):
    from compressor import apply

    chosen = Recipe.from_dict({"steps": [{"rotate": {"online_hadamard": False}}], "export": {"format": "dense"}})
    apply(chosen, tiny_llama, tmp_path / "out", progress=False)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rotated = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(rotated, original, rtol=1e-4, atol=1e-4)


def test_rotate_then_qllm_runs_through_the_online_hadamard(tmp_path, calibration_file):
    """QLLM after rotate: its down_proj statistics and error correction see the rotated inputs."""
    path = make_random_model("qwen3", tmp_path / "model")
    qllm = {"qllm": {"epochs": 1, "rank": 2, "feature_samples": 2, "search_candidates": 4, "heldout": 0.0}}
    session = session_of(path, [{"rotate": {}}, qllm], calibration_file)
    report = session.run()
    rows = [row for row in report.rows if row["step"] == "qllm" and row["module"].endswith("error_correction")]
    assert len(rows) == 2 and all(row["mse_final"] <= row["mse_init"] for row in rows)
    assert isinstance(session.handle.blocks[0].mlp, OnlineHadamardMLP)


def test_cayley_steps_stay_orthogonal_and_lower_the_proxy_loss():
    """SpinQuant's learned R1: from a random Hadamard, Cayley SGD keeps R orthogonal and lowers the W4A4 proxy
    loss on inputs with outlier channels."""
    from compressor.quant.rotate import learn_rotation, proxy_loss

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=generator)
    x[:, [3, 40]] *= 20
    groups = [(x, torch.randn(96, 64, generator=generator))]
    start = residual_rotation(64, generator)
    rotation, first, last = learn_rotation(start, groups, steps=30, lr=1.0, bits=4)
    torch.testing.assert_close(rotation.t() @ rotation, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-5)
    assert first == pytest.approx(float(proxy_loss(start.float(), groups, 4)), rel=1e-5)
    assert last < 0.9 * first


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_learned_rotation_keeps_the_logits(tmp_path, architecture, calibration_file):
    path = make_random_model(architecture, tmp_path / "model")
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(3))
    session = session_of(path, [{"rotate": {"learned_steps": 5, "learned_tokens": 64}}], calibration_file)
    session.run_model_step(session.recipe.steps[0])
    rows = [row for row in session.report.rows if row.get("module") == "residual_rotation"]
    assert rows and rows[0]["proxy_loss_end"] != rows[0]["proxy_loss_start"]
    with torch.no_grad():
        torch.testing.assert_close(materialized(session)(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
