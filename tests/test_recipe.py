"""Recipes: strict validation with one-line errors, YAML round trips, the generated reference."""

import pytest
from click.testing import CliRunner

from compressor import Recipe, RecipeError
from compressor.cli import main
from compressor.quant.rtn import RTN

MISTAKES = [
    # (recipe text, what the one-line error must contain)
    ("steps:\n  - rtn: {bits: 9}\n", "steps[0].rtn.bits: 9 is not one of 2..8"),
    ("steps:\n  - rtn: {bits: four}\n", "steps[0].rtn.bits: 'four' is not an integer"),
    ("steps:\n  - rtn: {bitz: 4}\n", "steps[0].rtn.bitz: unknown key (did you mean 'bits'?)"),
    ("steps:\n  - rnt: {bits: 4}\n", "steps[0].rnt: unknown step (did you mean 'rtn'?)"),
    ("steps:\n  - rtn: {group_size: 0}\n", "steps[0].rtn.group_size: 0 is not -1 or a positive integer"),
    ("steps:\n  - rtn: {symmetric: maybe}\n", "steps[0].rtn.symmetric: 'maybe' is not true or false"),
    ("steps:\n  - rtn: {ignore: lm_head}\n", "steps[0].rtn.ignore: 'lm_head' is not a list of strings"),
    ("steps: []\n", "steps: expected a non-empty list of steps"),
    ("stepz:\n  - rtn: {}\n", "stepz: unknown section (did you mean 'steps'?)"),
    ("steps:\n  - rtn: {}\n    rtn2: {}\n", "steps[0]: a step is a one-key mapping"),
    ("steps:\n  - rtn: {}\ncalibration: {samples: 0}\n", "calibration.samples: 0 is below the minimum 1"),
    ("steps:\n  - rtn: {}\nexport: {format: gguf}\n", "export.format: 'gguf' is not one of auto, compressed-tensors, compressor, dense"),
    ("steps:\n  - rtn: {}\nexport: {max_shard_size: huge}\n", "export.max_shard_size: 'huge' is not a size"),
    ("steps:\n  - rtn: {bits: 4\n", "not valid YAML"),
    ("- rtn\n", "a recipe is a mapping"),
    ("steps:\n  - rtn: [4]\n", "steps[0].rtn: expected a mapping of keys"),
]


@pytest.mark.parametrize("text, expected", MISTAKES)
def test_mistakes_give_one_line_naming_file_step_and_key(text, expected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["apply", str(path), "demo", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(main, ["apply", str(tmp_path / "nope.yaml"), "demo", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no such recipe file" in result.output


def test_unknown_model_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: [rtn]\n")
    result = CliRunner().invoke(main, ["apply", str(path), str(tmp_path / "missing-model"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no such model folder" in result.output


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    path = tmp_path / "r.yaml"
    path.write_text("steps: [rtn]\n")
    result = CliRunner().invoke(main, ["apply", str(path), str(tmp_path / "gpt2"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3" in result.output


def test_yaml_and_python_build_the_same_recipe(tmp_path):
    in_code = Recipe(steps=[RTN(bits=3, group_size=64)])
    path = tmp_path / "r.yaml"
    path.write_text(in_code.to_yaml())
    from_file = Recipe.from_yaml(path)
    assert from_file.to_dict() == in_code.to_dict()
    assert from_file.steps[0] == RTN(bits=3, group_size=64)


def test_a_bare_step_name_uses_the_defaults():
    recipe = Recipe.from_dict({"steps": ["rtn"]})
    assert recipe.steps == [RTN()] and not recipe.needs_calibration


def test_integers_are_accepted_for_numbers():
    from dataclasses import dataclass

    from compressor.step import Config, build_config, param

    @dataclass
    class Example(Config):
        rate: float = param(0.5, "a rate", min=0.0, max=1.0)

    assert build_config(Example, {"rate": 1}, "x", "f").rate == 1.0
    with pytest.raises(RecipeError, match=r"f: x.rate: 2 is above the maximum 1.0"):
        build_config(Example, {"rate": 2}, "x", "f")


def test_methods_lists_every_registered_step_and_key():
    from compressor.methods import registered_steps
    from compressor.step import step_reference

    output = CliRunner().invoke(main, ["methods"]).output
    for name, cls in registered_steps().items():
        assert name in output
        for key, _, _ in step_reference(cls):
            assert key in output


def test_readme_recipe_reference_is_current():
    """The README embeds the generated reference; regenerate it with scripts/update_readme.py."""
    from pathlib import Path

    from compressor.docs import recipe_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert recipe_reference() in readme


def test_hub_ids_fail_fast_offline_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from compressor.model import ModelLoadError, resolve_model_path

    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path("some-owner/some-model")
    assert "some-owner/some-model: could not download from the hub" in str(caught.value)
    assert "\n" not in str(caught.value)
