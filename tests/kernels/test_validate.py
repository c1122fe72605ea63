"""``compressor validate``: kernels vs reference per layer, perplexity through both paths, report."""

import json
import subprocess

import pytest
import torch

import compressor.kernels
from compressor import Recipe, apply
from compressor.export import load_quantized_model
from compressor.modules.linear import QuantizedLinear
from compressor.testing import make_random_model
from compressor.validate import (
    _main,
    format_validation_report,
    validate_checkpoint,
    validate_model,
)
from compressor.weights.values import DenseAndSparseWeight

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-bit asymmetric RTN export of a tiny Qwen2 (q/k/v carry biases), made by the toolkit."""
    root = tmp_path_factory.mktemp("validate")
    source = make_random_model("qwen2", root / "source", **TINY)
    recipe = Recipe.from_dict({"steps": [{"rtn": {"bits": 3, "group_size": 32, "symmetric": False}}], "export": {}})
    apply(recipe, source, root / "w3", progress=False)
    return root / "w3"


def windows(length=24, count=1):
    return torch.randint(0, 320, (count, length), generator=torch.Generator().manual_seed(0))


def test_validate_checkpoint_on_cpu_checks_correctness_only(checkpoint, tmp_path):
    out = tmp_path / "result.json"
    _main([str(checkpoint), "--json", str(out), "--options", json.dumps({"seq_len": 24, "max_windows": 1})])
    result = json.loads(out.read_text())
    assert result["ok"] and result["correctness_only"] and result["speed"] is None
    assert result["quantized_layers"] == len(result["layers"]) == 7
    assert all(row["kind"] == "uniform" and row["bits"] == 3 and row["ok"] for row in result["layers"])
    assert max(row["max_rel"] for row in result["layers"]) < 1e-5  # fp32 on the CPU
    assert result["perplexity"]["ok"] and result["perplexity"]["rel_diff"] < 1e-4
    assert result["perplexity"]["triton"] == pytest.approx(result["perplexity"]["reference"], rel=1e-4)
    report = format_validation_report(result)
    assert "only correctness was checked" in report and "result: OK" in report


def test_validate_runs_itself_in_the_interpreter_when_triton_was_imported_without_it(checkpoint, monkeypatch):
    """The CLI imports triton for a GPU before validate starts: validate reruns itself in a
    subprocess with TRITON_INTERPRET=1 (emulated here by running its entry point in-process)."""
    from compressor import validate

    calls = []
    runnable = validate.kernels_runnable

    def fake_run(command, env, capture_output, text):  # the child process: interpreter on from the start
        calls.append((command, env["TRITON_INTERPRET"]))
        assert command[1:3] == ["-m", "compressor.validate"]
        monkeypatch.setattr(validate, "kernels_runnable", runnable)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _main(command[3:])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(validate, "kernels_runnable", lambda device: (False, "compiled mode"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = validate_checkpoint(checkpoint, "cpu", seq_len=16, max_windows=1, max_layers=2)
    assert calls and calls[0][1] == "1"
    assert result["ok"] and len(result["layers"]) == 2 and "subprocess" in result["notes"][-1]


def test_a_kernel_that_is_off_fails_validation(checkpoint, monkeypatch):
    model = load_quantized_model(checkpoint)
    good = compressor.kernels.triton_linear

    def off_by_a_little(x, weight, bias=None, config=None):
        y = good(x, weight, bias, config)
        return y + 1e-3 * y.abs().max()

    monkeypatch.setattr(compressor.kernels, "triton_linear", off_by_a_little)
    result = validate_model(model, None, batches=(1,), max_layers=3)
    assert not result["ok"] and not any(row["ok"] for row in result["layers"])
    assert "FAILED" in format_validation_report(result)


def test_validate_model_with_lut_and_dense_and_sparse_layers(checkpoint, weights):
    model = load_quantized_model(checkpoint)
    mlp = model.model.layers[0].mlp
    for name in ("up_proj", "down_proj"):
        old = getattr(mlp, name)
        n, k = old.out_features, old.in_features
        lut = weights.lut(n, k, 4, lut_dtype=torch.float32, device="cpu")
        outliers = weights.outliers(n, k, value_dtype=torch.float32, device="cpu")
        weight = lut if name == "up_proj" else DenseAndSparseWeight.from_parts(lut, outliers)
        setattr(mlp, name, QuantizedLinear(weight))
    result = validate_model(model, windows(), batches=(1, 3))
    kinds = {row["name"].rsplit(".", 1)[1]: row["kind"] for row in result["layers"]}
    assert kinds["up_proj"] == "lut" and kinds["down_proj"] == "dense_and_sparse"
    assert result["ok"], format_validation_report(result)
