"""The quality benchmark's runner on a random tiny model: table columns, bits per weight, and that its
numbers are exactly ``compressor eval``'s."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from compressor.docs import QUALITY_COLUMNS
from compressor.testing import make_random_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("benchmarks.quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fp16_llama(tmp_path_factory):
    """Scales are exported in the checkpoint dtype: fp16 here, so the expected bits are exact."""
    return make_random_model("llama", tmp_path_factory.mktemp("fp16") / "llama", dtype=torch.float16)


RECIPES = {
    "w4-sym.yaml": "steps:\n  - rtn: {bits: 4, group_size: 128, symmetric: true}\n",
    "w4-asym.yaml": "steps:\n  - rtn: {bits: 4, group_size: 128, symmetric: false}\n",
    "later.yaml": "steps:\n  - some_future_method: {bits: 3}\n",
}


def test_runner_table_bits_and_eval_agree(quality, fp16_llama, calibration_file, tmp_path):
    from compressor import Recipe, apply
    from compressor.eval import evaluate_paths

    for name, text in RECIPES.items():
        (tmp_path / name).write_text(text)
    settings = quality.Settings(text=calibration_file, seq_len=32, max_windows=4)
    entries = [quality.fp_entry(), *quality.recipe_entries(tmp_path)]
    rows = quality.run_benchmark([str(fp16_llama)], entries, settings)
    by_recipe = {row["recipe"]: row for row in rows}

    assert by_recipe["-"]["bits_per_weight"] == 16 and by_recipe["-"]["gap"] == 0 and abs(by_recipe["-"]["kl"]) < 1e-9
    assert by_recipe["w4-sym.yaml"]["bits_per_weight"] == 4 + 16 / 128  # codes + fp16 scales
    assert by_recipe["w4-asym.yaml"]["bits_per_weight"] == pytest.approx(
        4 + (16 + 4) / 128, abs=1e-4
    )  # + zeros packed at 4 bits
    assert by_recipe["w4-sym.yaml"]["kl"] > 0 and by_recipe["w4-sym.yaml"]["size_bytes"] < by_recipe["-"]["size_bytes"]
    assert (
        by_recipe["later.yaml"]["error"].startswith("not run:")
        and "some_future_method" in by_recipe["later.yaml"]["error"]
    )

    # the same windows and code path as `compressor eval OUT --base MODEL`: identical numbers
    out = tmp_path / "out"
    apply(Recipe.from_yaml(tmp_path / "w4-asym.yaml"), fp16_llama, out, progress=False)
    direct = evaluate_paths(str(out), str(fp16_llama), text=calibration_file, seq_len=32, max_windows=4)
    assert (direct.perplexity, direct.kl_divergence, direct.windows) == tuple(
        by_recipe["w4-asym.yaml"][k] for k in ("perplexity", "kl", "windows")
    )
    assert quality.ct_bits_per_weight(out) == 4 + (16 + 4) / 128  # counted from the stored tensors

    record = quality.make_record([str(fp16_llama)], rows, settings, "python benchmarks/quality.py", {})
    lines = quality.markdown_table(record).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == QUALITY_COLUMNS
    assert all(line.count("|") == len(QUALITY_COLUMNS) + 1 for line in lines)
    assert [line.split("|")[2].strip() for line in lines[2:]] == [
        "w4-sym.yaml",
        "w4-asym.yaml",
        "-",
        "later.yaml",
    ]  # by bits, not-run last
    paths = quality.write_outputs(record, tmp_path / "results")
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert [p.suffix for p in paths if p.stat().st_size > 0] == [".json", ".md"] + [".png"] * plotted


def test_gptq_not_beating_rtn_is_explained(quality):
    rows = [
        {
            "model": "m",
            "method": "compressor rtn",
            "recipe": "rtn-w3.yaml",
            "bits_per_weight": 3.1484,
            "perplexity": 10.0,
            "notes": [],
        },
        {
            "model": "m",
            "method": "llm-compressor 0.14 gptq",
            "recipe": "W3",
            "bits_per_weight": 3.1484,
            "perplexity": 10.5,
            "notes": [],
        },
        {
            "model": "m",
            "method": "llm-compressor 0.14 gptq",
            "recipe": "W4",
            "bits_per_weight": 4.125,
            "perplexity": 9.0,
            "notes": [],
        },
    ]
    quality.compare_gptq_with_rtn(rows)
    assert "not better than RTN rtn-w3.yaml" in rows[1]["notes"][0] and rows[2]["notes"] == []


def test_update_keeps_rows_not_measured_again_and_refuses_other_settings(quality):
    base = {
        "eval": {"text": "demo", "seq_len": 512, "max_windows": 32, "windows": 32},
        "calibration": {"text": None, "samples": 32, "seq_len": 512},
        "model": "demo",
        "model_sha256": {"demo": "abc"},
        "machine": "m",
    }
    row = {"model": "demo", "bits_per_weight": 4.0, "perplexity": 1.0}
    previous = {
        **base,
        "date": "2026-11-23",
        "command": "old",
        "rows": [{**row, "method": "rtn", "recipe": "a"}, {**row, "method": "x", "recipe": "b"}],
    }
    record = {
        **base,
        "date": "2026-11-27",
        "command": "new",
        "rows": [{**row, "method": "x", "recipe": "b", "perplexity": 2.0}],
    }
    merged = quality.carry_over(previous, record)
    assert {(r["method"], r["measured"], r["perplexity"]) for r in merged["rows"]} == {
        ("rtn", "2026-11-23", 1.0),
        ("x", "2026-11-27", 2.0),
    }
    assert [h["command"] for h in merged["history"]] == ["old", "new"] and "then `new`" in quality.describe(merged)
    with pytest.raises(SystemExit, match="other settings"):
        quality.carry_over(previous, {**record, "eval": {**base["eval"], "max_windows": 8}})
    with pytest.raises(SystemExit, match="other weights"):
        quality.carry_over(previous, {**record, "model_sha256": {"demo": "def"}})
