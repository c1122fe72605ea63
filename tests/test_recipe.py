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
    (
        "steps:\n  - rtn: {}\nexport: {format: gguf}\n",
        "export.format: 'gguf' is not one of auto, compressed-tensors, gptq, compressor, dense",
    ),
    ("steps:\n  - rtn: {}\nexport: {max_shard_size: huge}\n", "export.max_shard_size: 'huge' is not a size"),
    ("steps:\n  - rtn: {bits: 4\n", "not valid YAML"),
    ("- rtn\n", "a recipe is a mapping"),
    ("steps:\n  - rtn: [4]\n", "steps[0].rtn: expected a mapping of keys"),
    ("steps:\n  - rtn: {ignore: ['re:(']}\n", "steps[0].rtn.ignore: 're:(' is not a valid regular expression"),
    (
        "steps:\n  - efficientqat_block_ap: {quant_lr: .nan}\n",
        "steps[0].efficientqat_block_ap.quant_lr: nan is not a finite",
    ),
    (
        "steps:\n  - efficientqat_block_ap: {quant_lr: .inf}\n",
        "steps[0].efficientqat_block_ap.quant_lr: inf is not a finite",
    ),
    ("steps:\n  - rtn: {}\ncalibration: {samples: 1000000000000000000000000000000}\n", "is beyond the largest"),
    pytest.param(b"steps:\n  - rtn: {}\n# caf\xe9\n", "not UTF-8 text", id="latin-1"),
    pytest.param("steps:\n  - rtn: {}\n".encode("utf-16"), "not UTF-8 text", id="utf-16"),
    pytest.param("steps:\n  - rtn: {}\ncalibration: {samples: " + "9" * 5000 + "}\n", "not a recipe", id="digits"),
    pytest.param("steps:\n  - rtn: " + "[" * 600 + "]" * 600 + "\n", "nested too deeply", id="deep"),
    pytest.param(  # anchors nested 9 deep: a billion strings if expanded
        "steps:\n  - rtn:\n      ignore: [&a [x, x, x, x, x, x, x, x, x, x], "
        + ", ".join(f"&{k} [{', '.join([f'*{j}'] * 10)}]" for j, k in zip("abcdefgh", "bcdefghi"))
        + "]\n",
        "is not a list of strings",
        id="billion laughs",
    ),
    ('steps:\n  - rtn: {"bit\\ns": 4}\n', "steps[0].rtn.'bit\\ns': unknown key"),
    pytest.param("steps:\n  - rtn: {bits: " + "x" * 500 + "}\n", "'xxxxxxxxxx", id="long value"),
]


@pytest.mark.parametrize("text, expected", MISTAKES)
def test_mistakes_give_one_line_naming_file_step_and_key(text, expected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(main, ["apply", str(path), "demo", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert len(lines[0]) < 400, lines[0]  # a value is quoted short, whatever its size
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(main, ["apply", str(tmp_path / "nope.yaml"), "demo", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no such recipe file" in result.output


def test_unknown_model_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: [rtn]\n")
    result = CliRunner().invoke(
        main, ["apply", str(path), str(tmp_path / "missing-model"), "-o", str(tmp_path / "out")]
    )
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


@pytest.mark.parametrize("text, expected", MISTAKES)
def test_the_python_api_gives_the_same_one_line_errors(text, expected, tmp_path):
    """The command line checks against the shipped catalogue first; ``Recipe.from_yaml`` against the live registry."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as caught:
        Recipe.from_yaml(path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_methods_lists_every_registered_step_and_key():
    from compressor.recipe import catalogue

    output, matrix = CliRunner().invoke(main, ["methods"]).output.split("\nwhich step runs on which family")
    lines = output.splitlines()
    titles = {line.split(" ", 1)[0]: i for i, line in enumerate(lines) if not line.startswith(" ")}
    live = catalogue()
    assert list(titles) == [*live["steps"], *(f"[{name}]:" for name in live["sections"])]
    for name, step in live["steps"].items():
        start = titles[name]
        assert lines[start].startswith(f"{name} ({step['kind']} step") and step["summary"] in lines[start]
        keys = [line.split()[0] for line in lines[start + 1 : start + 1 + len(step["params"])]]
        assert keys == [spec["key"] for spec in step["params"]]
    widths = {line.index(line.split()[1], len(line.split()[0]) + 4) for line in lines if line.startswith("    ")}
    assert len(widths) == 1, "the defaults column is aligned whatever the longest key"
    rows = [line.split(" | ")[0].strip("| `") for line in matrix.splitlines() if line.startswith("| `")]
    assert rows == list(live["steps"])  # then the support matrix: a row per step


def test_generated_files_are_current():
    """The recipe reference (docs/RECIPES.md), the quality table (docs/QUALITY.md) and the shipped recipe
    catalogue that the command line reads without torch: regenerate them with scripts/update_docs.py."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    script = root / "scripts" / "update_docs.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


LIGHT_RUN = """
import sys
from compressor.cli import main
try:
    main({args!r}, standalone_mode=False)
except BaseException as error:
    print("raised", type(error).__name__, error)
print("heavy:", sorted(m for m in ("torch", "transformers", "compressed_tensors") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["apply", "TYPO", "demo", "-o", "out"]])
def test_help_methods_and_recipe_typos_answer_without_importing_torch(args, tmp_path):
    import subprocess
    import sys

    typo = tmp_path / "typo.yaml"
    typo.write_text("steps:\n  - rtn: {bitz: 4}\n")
    args = [str(typo) if a == "TYPO" else a for a in args]
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_RUN.format(args=args)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.strip().endswith("heavy: []"), result.stdout + result.stderr
    if "apply" in args:
        assert "steps[0].rtn.bitz: unknown key" in result.stderr


@pytest.mark.parametrize(
    "before",
    [
        "",
        "import transformers.quantizers.auto",
        "from transformers import AutoModelForCausalLM",
        "import transformers; from transformers import AutoModelForCausalLM",
        "from transformers import AutoConfig",
    ],
)
def test_import_compressor_registers_the_native_format_and_architectures_in_any_import_order(before):
    import subprocess
    import sys

    code = (
        f"{before}\nimport compressor\nimport transformers.quantizers.auto as table\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as models\n"
        "print('compressor' in table.AUTO_QUANTIZER_MAPPING, 'compressor' in table.AUTO_QUANTIZATION_CONFIG_MAPPING,\n"
        "      type(AutoConfig.for_model('modegpt_llama')).__name__ in str(models.keys()),\n"
        "      type(AutoConfig.for_model('llama_swiftkv')).__name__ in str(models.keys()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["True", "True", "True", "True"], result.stderr[-2000:]


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 16
    for path in recipes:
        recipe = Recipe.from_yaml(path)
        assert recipe.steps, path


def test_hub_ids_fail_fast_offline_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from compressor.model import ModelLoadError, resolve_model_path

    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path("some-owner/some-model")
    assert "some-owner/some-model: could not download from the hub" in str(caught.value)
    assert "\n" not in str(caught.value)
