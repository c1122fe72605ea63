"""What a user sees when something goes wrong or takes long: one line naming the file and step,
no traceback, no folders left behind, and progress that reads well in a log."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.demo import demo_model_dir
from compressor.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def truncated_demo(tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(demo_model_dir(), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def test_a_truncated_checkpoint_is_one_line_from_apply_and_eval(truncated_demo, tmp_path):
    applied = CliRunner().invoke(
        main, ["apply", str(ROOT / "recipes" / "rtn-w4.yaml"), str(truncated_demo), "-o", str(tmp_path / "out")]
    )
    line = one_line_error(applied)
    assert f"{truncated_demo / 'model.safetensors'}: not a readable safetensors file" in line and "incomplete" in line
    evaluated = CliRunner().invoke(main, ["eval", str(truncated_demo), "--max-windows", "1"])
    assert f"{truncated_demo / 'model.safetensors'}: not a readable safetensors file" in one_line_error(evaluated)
    evaluated = CliRunner().invoke(main, ["eval", "demo", "--base", str(truncated_demo), "--max-windows", "1"])
    assert "not a readable safetensors file" in one_line_error(evaluated)


def test_a_group_size_the_model_cannot_take_stops_before_any_work(tmp_path):
    recipe = tmp_path / "g96.yaml"
    recipe.write_text("steps:\n  - rtn: {group_size: 96}\n")
    result = CliRunner().invoke(main, ["apply", str(recipe), "demo", "-o", str(tmp_path / "out")])  # progress on
    line = one_line_error(result)
    assert line.startswith(
        f"error: {recipe}: steps[0].rtn.group_size: model.layers.0.self_attn.q_proj: in_features 256"
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("steps", ["[rtn]", "[squeezellm]"])
def test_a_missing_calibration_file_is_named_not_fetched(steps, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: nosuchfile.txt}}\nsteps: {steps}\n")
    started = time.monotonic()
    result = CliRunner().invoke(main, ["apply", str(recipe), "demo", "-o", str(tmp_path / "out")])
    assert f"{recipe}: calibration.dataset: nosuchfile.txt: no such file or folder" in one_line_error(result)
    assert time.monotonic() - started < 30  # no network retries


def test_an_internal_error_in_a_step_is_one_line_naming_the_step(registered, monkeypatch, tmp_path):
    from compressor import recipe as recipe_module
    from compressor.step import Step

    @registered("broken")
    @dataclass
    class Broken(Step):
        """Test step that hits a bug."""

        needs_calibration = False

        def compress_block(self, context):
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(recipe_module, "shipped_catalogue", recipe_module.catalogue)
    path = tmp_path / "r.yaml"
    path.write_text("steps: [rtn, broken]\n")
    result = CliRunner().invoke(main, ["apply", str(path), "demo", "-o", str(tmp_path / "out"), "--quiet"])
    line = one_line_error(result, code=1)
    assert (
        line.startswith(f"error: {path}: steps[1].broken: TypeError: unsupported operand")
        and "COMPRESSOR_DEBUG=1" in line
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_the_partial_output_exits_128_plus_it_and_abandoned_ones_are_cleaned(signal_number, tmp_path):
    """``kill -TERM`` and Ctrl-C (SIGINT: 130, the shell's convention, not click's 1)."""
    out = tmp_path / "out"
    abandoned = tmp_path / ".out.partial-999999999"  # a pid no process has
    abandoned.mkdir()
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("calibration: {samples: 64, seq_len: 256}\nsteps:\n  - efficientqat_block_ap: {epochs: 20}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from compressor.cli import main; main()",
            "apply",
            str(recipe),
            "demo",
            "-o",
            str(out),
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    partial = tmp_path / f".out.partial-{process.pid}"
    while not partial.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), process.communicate()
    assert not abandoned.exists()
    process.send_signal(signal_number)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal_number
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yaml"]


def test_progress_in_a_log_is_plain_lines_with_the_numbers():
    stream = io.StringIO()
    with Progress(4, "efficientqat_e2e_qp: training", "step", interval=0.0, stream=stream) as progress:
        for loss in (0.5, 0.4, 0.3, 0.2):
            progress.update(loss=loss)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "efficientqat_e2e_qp: training: started, 0/4 step"
    assert lines[1].startswith("efficientqat_e2e_qp: training: 1/4 step, 0:00, ") and lines[1].endswith(
        "left, loss 0.5"
    )
    assert lines[-1].startswith("efficientqat_e2e_qp: training: done, 4/4 step, 0:00") and lines[-1].endswith(
        "loss 0.2"
    )
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    with Progress(4, "x", enabled=False, stream=quiet) as progress:
        progress.update(loss=1.0)
    assert quiet.getvalue() == ""


def test_apply_shows_each_phase_in_a_log(tmp_path, calibration_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"calibration: {{dataset: {calibration_file}, samples: 4, seq_len: 32}}\n"
        "steps:\n  - rtn: {bits: 4, group_size: 32}\n"
        "  - efficientqat_e2e_qp: {batch_size: 2, micro_batch_size: 2, epochs: 2}\n"
    )
    from compressor.testing import make_random_model

    model = make_random_model("llama", tmp_path / "tiny")
    result = CliRunner().invoke(main, ["apply", str(recipe), str(model), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    log = result.output
    assert "rtn: started, 0/2 block" in log and "rtn: done, 2/2 block" in log
    assert "efficientqat_e2e_qp: training: started, 0/4 step" in log
    assert "efficientqat_e2e_qp: training: done, 4/4 step" in log and "heldout" in log
    assert "efficientqat_e2e_qp: held-out loss" in log  # the report's training line


def damage_config(config: dict) -> None:
    config["hidden_size"] = config["hidden_size"] // 2


def damage_weight(folder: Path, how: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.int16) if how == "int16" else tensors[name].fill_(float("nan"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


DAMAGED = {  # what is done to a copy of the tiny Llama -> what the one line says
    "config disagrees with the weights": ("config", damage_config, r"embed_tokens.weight has shape \(320, 128\), but"),
    "config.json not JSON": ("text", "{not json", "could not read the model"),
    "unknown model_type": ("config", lambda c: c.update(model_type="llama9"), "could not read the model"),
    "bad dtype": ("config", lambda c: c.update(dtype="float99"), "could not read the model"),
    "integer weight": ("weight", "int16", "up_proj.weight is stored as I16, not floating point"),
    "NaN weight": ("weight", "nan", "up_proj.weight holds NaN or infinite values"),
    "no tokenizer": ("tokenizer", None, "could not read the model"),
    "code of its own": ("remote", None, "the model needs its own code to load; pass --trust-remote-code"),
}

HOMEMADE = """from transformers import LlamaConfig


class HomemadeConfig(LlamaConfig):
    model_type = "homemade"
"""


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_model_is_one_line_before_any_work(damage, tiny_llama, tmp_path):
    import json

    kind, how, expected = DAMAGED[damage]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    if kind == "config":
        config = json.loads((model / "config.json").read_text())
        how(config)
        (model / "config.json").write_text(json.dumps(config))
    elif kind == "text":
        (model / "config.json").write_text(how)
    elif kind == "weight":
        damage_weight(model, how)
    elif kind == "remote":
        config = json.loads((model / "config.json").read_text())
        config.update(model_type="homemade", auto_map={"AutoConfig": "configuration_homemade.HomemadeConfig"})
        (model / "config.json").write_text(json.dumps(config))
        (model / "configuration_homemade.py").write_text(HOMEMADE)
    else:
        for file in model.glob("tokenizer*"):
            file.unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 2, seq_len: 16}\nsteps:\n  - gptq: {group_size: 32}\n")
    result = CliRunner().invoke(main, ["apply", str(recipe), str(model), "-o", str(tmp_path / "out"), "--quiet"])
    line = one_line_error(result)
    assert re.search(expected, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "step, expected",
    [
        ("modegpt: {round_to: 100000}", "steps[0].modegpt.round_to: 100000 does not fit this model"),
        ("swiftkv: {top_k: 100000000}", "steps[0].swiftkv.top_k: 100000000 is more than the model's vocabulary"),
        ("transmla_heal: {top_k: 5000}", "steps[0].transmla_heal.top_k: 5000 is more than the model's vocabulary"),
        ("qllm: {rank: 2147483647}", "steps[0].qllm.rank: 2147483647 is more than model.layers.0.self_attn.q_proj's"),
    ],
)
def test_sizes_the_model_cannot_take_are_one_line_before_any_work(step, expected, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{samples: 2, seq_len: 16}}\nsteps:\n  - {step}\n")
    result = CliRunner().invoke(main, ["apply", str(recipe), "demo", "-o", str(tmp_path / "out"), "--quiet"])
    assert expected in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_calibration_that_cannot_fit_in_memory_is_one_line_before_any_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 1000000000, seq_len: 512}\nsteps: [gptq]\n")
    started = time.monotonic()
    result = CliRunner().invoke(main, ["apply", str(recipe), "demo", "-o", str(tmp_path / "out"), "--quiet"])
    line = one_line_error(result)
    assert f"{recipe}: calibration.samples: 1000000000 x seq_len 512 needs about" in line and "use fewer" in line
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()


def test_a_kill_at_any_moment_of_an_overwrite_leaves_a_whole_output_and_no_leftovers(tmp_path):
    """SIGKILL at several moments of ``apply --overwrite`` (during the work, around the swap): the output is
    always a whole checkpoint (the old or the new), and the next run leaves nothing else beside it."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from compressor.cli import main; main()", "apply"]
    command += [str(ROOT / "recipes" / "rtn-w4.yaml"), "demo", "-o", str(out), "--quiet", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, env=env, check=True, capture_output=True)
    for delay in (0.5, 2.0, 4.0, 6.0):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert (out / "compressor.json").is_file() and (out / "config.json").is_file(), delay
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_eval_and_validate_of_a_checkpoint_with_code_of_its_own_ask_for_the_flag(tiny_llama, tmp_path):
    import json

    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - rtn: {group_size: 32}\n")
    assert CliRunner().invoke(main, ["apply", str(recipe), str(tiny_llama), "-o", str(out), "--quiet"]).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="homemade", auto_map={"AutoConfig": "configuration_homemade.HomemadeConfig"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_homemade.py").write_text(HOMEMADE)
    for command in ("eval", "validate"):
        line = one_line_error(CliRunner().invoke(main, [command, str(out)]))
        assert line.endswith("the model needs its own code to load; pass --trust-remote-code if you trust it"), line
