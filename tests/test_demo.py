"""The README's commands on the bundled demo model, end to end through the CLI."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoConfig

from compressor.cli import main
from compressor.demo import DEMO_DIR, demo_model_dir, demo_text_path


def test_demo_ships_model_tokenizer_and_text():
    config = AutoConfig.from_pretrained(demo_model_dir())
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads
    assert (demo_model_dir() / "tokenizer.json").is_file()
    assert (
        len(demo_text_path("heldout").read_text()) > 50_000 and len(demo_text_path("calibration").read_text()) > 50_000
    )
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20


@pytest.mark.slow
def test_readme_apply_then_eval_on_demo(tmp_path):
    out = tmp_path / "demo-w4"
    runner = CliRunner()
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rtn-w4.yaml"  # whatever the working directory
    applied = runner.invoke(main, ["apply", str(recipe), "demo", "-o", str(out), "--quiet"])
    assert applied.exit_code == 0, applied.output
    assert "bits_per_weight" in applied.output and (out / "model.safetensors").is_file()
    numbers = tmp_path / "eval.json"
    evaluated = runner.invoke(main, ["eval", str(out), "--base", "demo", "--max-windows", "8", "--json", str(numbers)])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(numbers.read_text())
    assert result["windows"] == 8 and 0 < result["kl_divergence"] < 0.5
    assert abs(result["perplexity_gap"]) < 0.2 * result["base_perplexity"]
