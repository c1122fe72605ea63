"""Every export format loads where docs/EXPORT.md says, with the logits of the model the session held in
memory before export: plain ``AutoModelForCausalLM.from_pretrained`` for compressed-tensors (symmetric),
GPTQ (with optimum + gptqmodel installed) and dense exports; after ``import compressor`` or with remote code
for our native format; our own loader for all of them. And every format fails closed: a process that never
imported compressor either computes the compressed model or refuses it, never hands back random weights."""

import copy
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor.api
from compressor import Recipe, apply
from compressor.export import load_quantized_model
from compressor.export.checkpoint import CheckpointWriter
from compressor.modules.linear import QuantizedLinear

HAS_GPTQ_STACK = all(importlib.util.find_spec(name) is not None for name in ("optimum", "gptqmodel"))


class RecordingWriter(CheckpointWriter):
    """Keeps a copy of every module the session hands to the export (what it held in memory)."""

    modules: dict = {}

    def write_module(self, prefix, module):
        RecordingWriter.modules[prefix] = copy.deepcopy(module)
        super().write_module(prefix, module)


def export_and_in_memory(recipe, source, out, monkeypatch, quantized=True):
    """Export ``recipe`` of ``source`` to ``out``; return the model as the session held it (the
    source with the finished blocks put in), in fp32 (``quantized``: some linear of it is quantized)."""
    RecordingWriter.modules = {}
    monkeypatch.setattr(compressor.api, "CheckpointWriter", RecordingWriter)
    apply(recipe, source, out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for prefix, module in RecordingWriter.modules.items():
        model.set_submodule(prefix, module.float())
    assert any(isinstance(m, QuantizedLinear) for m in model.modules()) == quantized
    return model


def tokens(vocab=320):
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(0))


def rtn(bits, group_size=32, symmetric=True, **export):
    return Recipe.from_dict(
        {"steps": [{"rtn": {"bits": bits, "group_size": group_size, "symmetric": symmetric}}], "export": export}
    )


@torch.no_grad()
@pytest.mark.parametrize("bits", [4, 3])
def test_compressed_tensors_symmetric_loads_in_plain_transformers(bits, tiny_llama, tmp_path, monkeypatch):
    memory = export_and_in_memory(rtn(bits), tiny_llama, tmp_path / "out", monkeypatch)
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "compressed-tensors"
    )
    x = tokens()
    expected = memory(x).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_quantized_model(tmp_path / "out")(x).logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("bits, symmetric", [(4, True), (3, False), (2, False)])
def test_gptq_loads_through_our_loader_with_the_in_memory_logits(bits, symmetric, tiny_llama, tmp_path, monkeypatch):
    memory = export_and_in_memory(
        rtn(bits, symmetric=symmetric, format="gptq"), tiny_llama, tmp_path / "out", monkeypatch
    )
    x = tokens()
    torch.testing.assert_close(load_quantized_model(tmp_path / "out")(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.skipif(
    not HAS_GPTQ_STACK, reason="transformers loads GPTQ through optimum + gptqmodel, not installed here"
)
@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, True), (3, False), (2, False)])
def test_gptq_loads_in_plain_transformers(bits, symmetric, tiny_llama, tmp_path, monkeypatch):
    memory = export_and_in_memory(
        rtn(bits, symmetric=symmetric, format="gptq"), tiny_llama, tmp_path / "out", monkeypatch
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    theirs = loaded.model.layers[1].mlp.down_proj
    ours = memory.model.layers[1].mlp.down_proj.quantized_weight.dequantize(torch.float32)
    # gptqmodel's own unpacking (qweight/qzeros, v1 -> v2 zero points), in its float16 arithmetic
    torch.testing.assert_close(theirs.dequantize_weight().t().float(), ours, rtol=2e-3, atol=1e-4)
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, memory(x).logits, rtol=0, atol=2e-2)  # fp16 kernels on the CPU


@torch.no_grad()
def test_native_format_loads_after_import_compressor(tiny_llama, calibration_file, tmp_path, monkeypatch):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 32},
            "steps": [{"squeezellm": {"bits": 3, "sensitive_percent": 0.05, "outlier_percent": 0.4, "iterations": 5}}],
        }
    )
    memory = export_and_in_memory(recipe, tiny_llama, tmp_path / "out", monkeypatch)
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "compressor"
    )
    x = tokens()
    expected = memory(x).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # compressor is imported above
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantizedLinear)
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_dense_export_loads_in_plain_transformers(tiny_llama, tmp_path, monkeypatch):
    memory = export_and_in_memory(rtn(3, symmetric=False, format="dense"), tiny_llama, tmp_path / "out", monkeypatch)
    x = tokens()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(loaded(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gptq_with_dense_block_linears_names_them_for_every_reader(tiny_llama, tmp_path, monkeypatch):
    recipe = Recipe.from_dict(
        {
            "steps": [{"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "*down_proj*"]}}],
            "export": {"format": "gptq"},
        }
    )
    memory = export_and_in_memory(recipe, tiny_llama, tmp_path / "out", monkeypatch)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["modules_in_block_to_quantize"] == [
        ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    ]
    assert sorted(config["dynamic"]) == [
        r"-:^model\.layers\.0\.mlp\.down_proj$",
        r"-:^model\.layers\.1\.mlp\.down_proj$",
    ]
    x = tokens()
    torch.testing.assert_close(load_quantized_model(tmp_path / "out")(x).logits, memory(x).logits, rtol=1e-5, atol=1e-5)
    if HAS_GPTQ_STACK:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
        assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
        torch.testing.assert_close(loaded(x).logits, memory(x).logits, rtol=0, atol=2e-2)


PLAIN_LOAD = """
import sys, torch
if sys.argv[3] == "without compressor installed":
    sys.modules["compressor"] = None  # `import compressor` raises ImportError, as where it is not installed
from transformers import AutoModelForCausalLM
assert "compressor" not in sys.modules or sys.modules["compressor"] is None
try:
    remote = sys.argv[3] != "plain"
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=remote)
except Exception as error:
    print("raised", type(error).__name__, str(error).splitlines()[0][:300])
else:
    tokens = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))
    torch.save(model(tokens).logits.detach(), sys.argv[2])
    print("loaded")
"""


def load_elsewhere(out, how: str) -> tuple[str, torch.Tensor | None]:
    """Load ``out`` in a fresh process that never imports compressor (``how``: plain, with remote code, or with
    remote code where compressor cannot be imported); what happened, and the logits on ``tokens()`` if it loaded."""
    import subprocess
    import sys

    saved = out.parent / f"{out.name}-{how.replace(' ', '-')}.pt"
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out), str(saved), how], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("raised", "loaded"))]
    assert result.returncode == 0 and lines, result.stderr[-2000:]
    return lines[-1], torch.load(saved) if lines[-1] == "loaded" else None


FAIL_CLOSED = {  # export -> (recipe steps, export section, whether a plain load computes it)
    "compressed-tensors symmetric": ([{"rtn": {"bits": 4, "group_size": 32}}], {}, True),
    "compressed-tensors asymmetric": ([{"rtn": {"bits": 4, "group_size": 32, "symmetric": False}}], {}, False),
    "gptq": ([{"rtn": {"bits": 4, "group_size": 32}}], {"format": "gptq"}, HAS_GPTQ_STACK),
    "native weights": ([{"bfp": {"k_bits": None, "weight_bits": 8}}], {}, False),
    "native KV cache": ([{"bfp": {"k_bits": 4, "block_size": 16, "ksort": "weight_norm"}}], {}, False),
    "dense": ([{"rtn": {"bits": 3}}], {"format": "dense"}, True),
}


@torch.no_grad()
@pytest.mark.parametrize("export", list(FAIL_CLOSED))
def test_every_format_fails_closed_where_compressor_is_not_imported(export, tiny_llama, tmp_path):
    """Whatever loads an export either computes the compressed model or refuses: never random weights."""
    steps, section, computes = FAIL_CLOSED[export]
    out = tmp_path / "out"
    apply(
        Recipe.from_dict({"steps": steps, "export": {"dtype": "float32", **section}}), tiny_llama, out, progress=False
    )
    expected = load_quantized_model(out)(tokens()).logits
    outcome, logits = load_elsewhere(out, "plain")
    if computes:
        assert outcome == "loaded", outcome
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    else:
        assert outcome.startswith("raised"), outcome
    if json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("quant_method") == "compressor":
        outcome, logits = load_elsewhere(out, "with remote code")  # the shipped file imports compressor
        assert outcome == "loaded", outcome
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        outcome, _ = load_elsewhere(out, "without compressor installed")
        assert outcome.startswith("raised ImportError") and "pip install compressor" in outcome, outcome


IMPORT_ORDERS = (
    "import compressor\nfrom transformers import AutoModelForCausalLM",
    "from transformers import AutoModelForCausalLM\nimport compressor",
    "import transformers\nfrom transformers import AutoModelForCausalLM\nimport compressor",
    "from transformers import AutoConfig, AutoModelForCausalLM\nimport compressor.export",
)


@torch.no_grad()
def test_a_native_export_loads_quantized_in_every_import_order(tiny_llama, tmp_path):
    """Registration is checked by loading a real export in a fresh process: its layers and its logits."""
    import subprocess
    import sys

    out = tmp_path / "out"
    steps = [{"bfp": {"k_bits": None, "weight_bits": 6}}]
    apply(Recipe.from_dict({"steps": steps, "export": {"dtype": "float32"}}), tiny_llama, out, progress=False)
    expected = load_quantized_model(out)(tokens()).logits
    for index, order in enumerate(IMPORT_ORDERS):
        saved = tmp_path / f"logits-{index}.pt"
        code = (
            f"{order}\nimport torch\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
            "print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
            "x = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))\n"
            f"torch.save(m(x).logits.detach(), {str(saved)!r})\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (order, result.stderr[-2000:])
        assert result.stdout.split()[-1] == "QuantizedLinear", order
        torch.testing.assert_close(torch.load(saved), expected, rtol=1e-5, atol=1e-5)
