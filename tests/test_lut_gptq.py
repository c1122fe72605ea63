"""LUT-GPTQ: GPTQ's error feedback onto per-row codebooks beats nearest-codebook rounding on a correlated
Hessian, the codebook update is the exact least-squares optimum for fixed codes, the column sweep shared with
GPTQ is unchanged by the callback, and rotate + gptq / lut-gptq exports load back with the in-memory logits."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import compressor.api
from compressor import Recipe, apply
from compressor.export import load_quantized_model
from compressor.export.checkpoint import CheckpointWriter
from compressor.quant.codebook import assign
from compressor.quant.gptq import add_to_hessian, hessian, refit_rows, weighted_output_error
from compressor.quant.lut_gptq import lut_gptq_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_hessian(k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=generator) / k**0.5 + torch.eye(k)
    x = torch.randn(4 * k, k, generator=generator) @ mix
    x[:, torch.randperm(k, generator=generator)[:4]] *= 6
    total = torch.zeros(k, k)
    return hessian(total, add_to_hessian(total, x))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [2, 3])
def test_error_feedback_beats_nearest_codebook_rounding(seed, bits):
    """On the same stored codebook, the sweep's codes have a lower Hessian-weighted error than each weight's
    nearest centroid (SqueezeLLM's assignment), by a clear margin on a correlated Hessian."""
    h = correlated_hessian(96, seed)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(seed + 10))
    result = lut_gptq_quantize(w, h, bits, rounds=2)
    lut = result.weight.lut.float().sort(1).values
    nearest = lut.gather(1, assign(w, lut))
    ours = weighted_output_error(w, result.weight.dequantize(torch.float32), h)
    assert ours < 0.8 * weighted_output_error(w, nearest, h)
    assert result.weight.bits_per_weight() == bits + 16 * 2**bits / 96


def test_codebook_update_is_the_least_squares_optimum_for_fixed_codes():
    """The refit never raises the error, and no perturbation of one centroid lowers it (first-order optimality)."""
    h = correlated_hessian(64, 3).double()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).double()
    centroids = torch.linspace(-2, 2, 8).double().repeat(8, 1)
    codes = assign(w.float(), centroids.float())
    before = weighted_output_error(w, centroids.gather(1, codes), h)
    refit = refit_rows(w, h, codes, torch.ones_like(w), centroids)
    best = weighted_output_error(w, refit.gather(1, codes), h)
    assert best <= before
    for delta in (1e-3, -1e-3):
        for entry in range(8):
            moved = refit.clone()
            moved[:, entry] += delta
            assert weighted_output_error(w, moved.gather(1, codes), h) >= best - 1e-9


def test_unused_centroid_keeps_its_value():
    h = correlated_hessian(32, 5)
    w = torch.randn(4, 32)
    centroids = torch.tensor([[-1.0, 0.0, 1.0, 50.0]]).repeat(4, 1)
    codes = assign(w, centroids)
    assert not bool((codes == 3).any())
    assert torch.equal(refit_rows(w, h, codes, torch.ones_like(w), centroids)[:, 3], centroids[:, 3])


def recipe(calibration_file, *steps, export="auto"):
    calibration = {"dataset": calibration_file, "samples": 8, "seq_len": 32, "seed": 0}
    return Recipe.from_dict({"calibration": calibration, "steps": list(steps), "export": {"format": export}})


def tokens(tiny_llama, calibration_file) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(tiny_llama)(open(calibration_file).read())["input_ids"]
    return torch.tensor(ids[: 2 * 40]).reshape(2, 40)


class RecordingWriter(CheckpointWriter):
    """Keeps the model as the session held it: each finished block as handed to the export, and the rest
    (rotated embeddings, head, norms) as it is when the export finishes."""

    model = None

    def write_module(self, prefix, module):
        super().write_module(prefix, module)
        self.blocks = {**getattr(self, "blocks", {}), prefix: copy.deepcopy(module)}

    def finish(self, handle, recipe, report, declared=None):
        RecordingWriter.model = copy.deepcopy(handle.model).float().eval()
        for prefix, module in self.blocks.items():
            RecordingWriter.model.set_submodule(prefix, module.float())
        return super().finish(handle, recipe, report, declared)


@torch.no_grad()
@pytest.mark.parametrize(
    "quantizer",
    [
        {"gptq": {"bits": 4, "group_size": 32, "symmetric": True}},
        {"gptq": {"bits": 3, "group_size": 32, "symmetric": False}},
        {"lut-gptq": {"bits": 3}},
    ],
)
def test_rotate_then_quantizer_exports_a_checkpoint_with_the_in_memory_logits(
    tiny_llama, calibration_file, tmp_path, monkeypatch, quantizer
):
    """rotate (no online Hadamard) then gptq or lut-gptq: the exported checkpoint loads back with the logits
    of the model the session held in memory (in plain transformers too for compressed-tensors), and its
    quantized linears are the rotated ones (the norms' gains are 1: folded)."""
    monkeypatch.setattr(compressor.api, "CheckpointWriter", RecordingWriter)
    chosen = recipe(calibration_file, {"rotate": {"online_hadamard": False}}, quantizer)
    apply(chosen, tiny_llama, tmp_path / "out", progress=False)
    x = tokens(tiny_llama, calibration_file)
    in_memory = RecordingWriter.model(x).logits
    loaded = load_quantized_model(tmp_path / "out")
    torch.testing.assert_close(loaded(x).logits, in_memory, rtol=1e-4, atol=1e-4)
    assert all(bool((norm.weight == 1).all()) for name, norm in loaded.named_modules() if name.endswith("layernorm"))
    method = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"]
    if method == "compressed-tensors":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        torch.testing.assert_close(plain(x).logits, in_memory, rtol=1e-4, atol=1e-4)


def test_lut_gptq_step_beats_squeezellm_rounding_through_apply(tiny_llama, calibration_file, tmp_path):
    """Through ``apply``: every linear's output error is below that of the same-size SqueezeLLM codebook step."""
    ours = apply(recipe(calibration_file, {"lut-gptq": {"bits": 3}}), tiny_llama, tmp_path / "a", progress=False)
    rows = [row for row in ours.rows if row["step"] == "lut-gptq"]
    assert len(rows) == 14 and all(0 < row["output_error"] < 1 for row in rows)
    x = tokens(tiny_llama, calibration_file)
    squeeze = apply(recipe(calibration_file, {"squeezellm": {"bits": 3}}), tiny_llama, tmp_path / "b", progress=False)
    assert squeeze.summary["bits_per_weight"] == ours.summary["bits_per_weight"]
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(x).logits.log_softmax(-1)
        kl = []
        for folder in ("a", "b"):
            logits = load_quantized_model(tmp_path / folder)(x).logits.log_softmax(-1)
            kl.append(float((original.exp() * (original - logits)).sum(-1).mean()))
    assert kl[0] < kl[1]
