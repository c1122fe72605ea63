"""Perplexity and KL: deterministic, equal to transformers' own loss, zero against itself."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.eval import evaluate, make_windows


def test_perplexity_matches_the_models_own_loss(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    windows = make_windows(torch.randint(0, 320, (200,), generator=torch.Generator().manual_seed(0)), seq_len=48)
    assert windows.shape == (4, 48)
    result = evaluate(model, windows, batch_size=3)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss  # mean over all predicted tokens
    assert math.isclose(result.perplexity, math.exp(loss.item()), rel_tol=1e-5)
    assert result.tokens == 4 * 47


def test_kl_against_itself_is_zero_and_positive_against_another(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    windows = make_windows(torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(1)), seq_len=25)
    same = evaluate(model, windows, base=model)
    assert abs(same.kl_divergence) < 1e-6 and same.perplexity_gap == 0
    other = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    different = evaluate(other, windows, base=model)
    assert different.kl_divergence > 1e-3
    assert different.base_perplexity == same.perplexity


def test_max_windows():
    assert make_windows(torch.arange(1000), 100, max_windows=3).shape == (3, 100)


def test_eval_reads_asymmetric_exports_through_our_loader(tiny_llama, tmp_path):
    from compressor import Recipe, apply
    from compressor.eval import load_causal_lm

    apply(
        Recipe.from_dict({"steps": [{"rtn": {"bits": 3, "group_size": 32, "symmetric": False}}]}),
        tiny_llama,
        tmp_path / "out",
        progress=False,
    )
    model, _ = load_causal_lm(str(tmp_path / "out"))
    windows = make_windows(torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(2)), seq_len=25)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    result = evaluate(model, windows, base=base)
    assert result.kl_divergence > 0 and math.isfinite(result.perplexity)


@pytest.mark.parametrize("offloaded", [False, True])
def test_the_streamed_base_gives_the_numbers_of_the_whole_model(tiny_llama, tiny_models, monkeypatch, offloaded):
    """``compressor eval`` runs the base block by block (blocks in CPU memory when it does not fit)."""
    from compressor.eval import StreamedModel
    from compressor.model import ModelHandle

    monkeypatch.setattr(ModelHandle, "fits_on", lambda self, device, dtype, fraction=0.8: not offloaded)
    streamed = StreamedModel(tiny_llama, "cpu")
    assert streamed.runner.offloaded == offloaded
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    windows = make_windows(torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(3)), seq_len=25)
    expected, got = evaluate(other, windows, base=whole), evaluate(other, windows, base=streamed)
    assert math.isclose(got.kl_divergence, expected.kl_divergence, rel_tol=1e-4)
    assert math.isclose(got.base_perplexity, expected.base_perplexity, rel_tol=1e-5)


def test_eval_loads_a_model_with_its_own_code_only_when_trusted(tiny_llama, tmp_path):
    """A checkpoint whose architecture ships as modeling code (``auto_map``) that compressor does not
    register: ``compressor eval`` refuses it with one line, and scores it with --trust-remote-code."""
    import json
    import shutil

    from click.testing import CliRunner

    from compressor.cli import main

    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="toy_remote_llama",
        architectures=["ToyForCausalLM"],
        auto_map={"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_toy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass ToyConfig(LlamaConfig):\n    model_type = 'toy_remote_llama'\n"
    )
    (folder / "modeling_toy.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_toy import ToyConfig\n\n\n"
        "class ToyForCausalLM(LlamaForCausalLM):\n    config_class = ToyConfig\n"
    )
    refused = CliRunner().invoke(main, ["eval", str(folder), "--max-windows", "1", "--seq-len", "64", "--quiet"])
    assert refused.exit_code == 2 and "pass --trust-remote-code if you trust it" in refused.output, refused.output
    trusted = CliRunner().invoke(
        main,
        [
            "eval",
            str(folder),
            "--base",
            str(tiny_llama),
            "--max-windows",
            "1",
            "--seq-len",
            "64",
            "--quiet",
            "--trust-remote-code",
        ],
    )
    assert trusted.exit_code == 0, trusted.output
    assert "KL" in trusted.output
