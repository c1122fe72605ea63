"""Quality benchmark: how much quality each method keeps at a given size, side by side with peers.

    python benchmarks/quality.py                  # the demo model, every entry
    python benchmarks/quality.py --quick          # fewer windows and calibration samples (~20 min on 2 cores)
    python benchmarks/quality.py --model PATH_OR_HUB_ID [--model ...] [--only rtn --only fp]

Entries (rows): ``fp`` (the model as it is); every ``recipes/*.yaml`` whose steps are registered,
applied with ``compressor.apply`` (a recipe naming an unregistered step becomes a "not run" row
with the reason, so new methods show up by adding a recipe file); and peers through their own
public APIs when installed: llm-compressor GPTQ and AWQ, HQQ and torchao int4 weight-only. A peer that
cannot run here is a row saying why, never dropped.

Every entry of a model is scored on the SAME held-out windows, built once, by the same functions
``compressor eval`` calls (``load_causal_lm``, ``heldout_stream``, ``make_windows``, ``evaluate``
with its defaults): perplexity, its gap to the fp model, and the mean per-token KL divergence
KL(p_fp || p_method). Our rows therefore reproduce ``compressor eval OUT --base MODEL`` exactly.

Bits per weight count everything stored per quantized weight of the decoder-block linears (the
embeddings and ``lm_head`` stay in the checkpoint dtype and are not counted; size on disk covers
them): the codes, the scales at their stored width (16 bits here), zero points as stored (our and
compressed-tensors' asymmetric exports pack them at ``bits`` bits each, along the output dim), and
codebooks or sparse parts. So 4-bit g128 symmetric = 4 + 16/128 = 4.125 and 4-bit g128 asymmetric
= 4 + (16 + 4)/128 = 4.15625, not the naive 4.25 that counts fp16 zeros. Our rows take the number
from the ``apply`` report's summary; compressed-tensors peers are counted from their safetensors
the same way; HQQ and torchao from the tensors they hold (HQQ keeps fp16/bf16 zeros, and packs 3-bit
codes ten to an int32, i.e. 3.2 bits). Dense/fp rows: the bits of the checkpoint dtype.

Time is wall time of the compression (loading included); peak memory is the peak resident memory
of the process doing it (the Linux high-water mark, reset before each entry; the GPTQ worker is its
own process).

Peers: llm-compressor pins other transformers/compressed-tensors versions than ours, so it runs in a
worker process (``llmcompressor_worker.py``) under its own interpreter (``--llmcompressor-python``, e.g.
a venv made with ``python -m venv --system-site-packages V && V/bin/pip install llmcompressor
torch==OURS``, keeping our torch); it quantizes with the same calibration tokens our recipes get, writes a
compressed-tensors checkpoint, and that checkpoint is scored by our eval here. Its AWQ runs as the
paper's (activation-only scales, ``duo_scaling: false``) followed by its RTN (``QuantizationModifier``),
as ``recipes/awq-*.yaml`` do with ours; it scales v_proj -> o_proj only when their shapes match (no
grouped-query attention) and searches no clipping, where ours ties the scale over query heads and clips.
HQQ and torchao run in this process (``pip install hqq torchao``; they need no other versions). Nothing
is downloaded: hub access is switched off.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compressor.docs import describe, markdown_table, sort_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (bits, group size, symmetric): the schemes of recipes/rtn-w4, -w3 and -w2, so peers are compared at the same size
GPTQ_SCHEMES = [(4, 128, True), (3, 128, False), (2, 64, False)]
HQQ_SCHEMES = [(4, 128), (3, 128), (2, 64)]


@dataclass
class Settings:
    text: str = "demo"  # held-out text for perplexity
    seq_len: int = 512
    max_windows: int | None = None
    calibration: str | None = None  # calibration text for every calibrated entry; None: each recipe's own, GPTQ 'demo'
    calibration_samples: int | None = None  # None: each recipe's own; GPTQ gets CalibrationConfig's default
    calibration_seq_len: int | None = None
    llmcompressor_python: str = sys.executable


@dataclass
class Compressed:
    """What an entry produced: a checkpoint to load with our eval, or a model already in memory."""

    bits_per_weight: float
    size_bytes: int
    path: Path | None = None
    model: object = None
    notes: list[str] = field(default_factory=list)
    peak_gib: float | None = None  # set by entries that compress in another process


class CannotRunHere(Exception):
    """An entry's library cannot run on this machine (its row says "not run" and why)."""


@dataclass
class Entry:
    method: str
    recipe: str
    compress: Callable[[str, Path, Settings], Compressed] | None = None  # (model path, work dir, settings)
    error: str | None = None  # why it cannot run here


# ----------------------------------------------------------------------------------------------
# Measuring


def release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory() -> None:
    """Reset this process's resident high-water mark (Linux), so the next reading is one entry's."""
    release_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dtype_bits(dtype) -> int:
    import torch

    return torch.finfo(dtype).bits


def safetensors_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def ct_bits_per_weight(folder: Path) -> float:
    """Bits per weight of a compressed-tensors checkpoint's packed linears, counted from its tensors:
    codes, scales (global ones too), zero points and group indices as stored (``weight_shape`` and biases
    excluded). Float formats have no ``weight_shape``: FP8 keeps its codes as ``weight``, FP4 packs two a byte."""
    from safetensors import safe_open

    stored = weights = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            names = list(handle.keys())
            for name in names:
                if not name.endswith(".weight_scale"):
                    continue
                module = name.removesuffix(".weight_scale")
                if f"{module}.weight_shape" in names:
                    n, k = (int(v) for v in handle.get_tensor(f"{module}.weight_shape"))
                elif f"{module}.weight_packed" in names:  # FP4: two E2M1 codes a byte
                    n, half = handle.get_slice(f"{module}.weight_packed").get_shape()
                    k = 2 * half
                else:  # FP8: the E4M3 codes are the ``weight``
                    n, k = handle.get_slice(f"{module}.weight").get_shape()
                weights += n * k
                suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
                if f"{module}.weight_packed" not in names:
                    suffixes += ("weight",)
                for suffix in suffixes:
                    if f"{module}.{suffix}" in names:
                        tensor = handle.get_tensor(f"{module}.{suffix}")
                        stored += tensor.numel() * tensor.element_size() * 8
    if not weights:
        raise ValueError(f"{folder}: no packed quantized weights")
    return stored / weights


def stored_dtype(model: str):
    """The checkpoint's own dtype (``load_causal_lm`` loads in fp32 and says so in the config)."""
    from transformers import AutoConfig

    from compressor.model import checkpoint_dtype, resolve_model_path

    return checkpoint_dtype(AutoConfig.from_pretrained(resolve_model_path(model)))


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------------------------
# Our entries


def fp_entry() -> Entry:
    def run(model, work, settings):
        from compressor.model import resolve_model_path

        path = resolve_model_path(model)
        return Compressed(dtype_bits(stored_dtype(model)), safetensors_size(path), path=path)

    return Entry("fp", "-", run)


def recipe_entries(folder: Path = ROOT / "recipes") -> list[Entry]:
    """One entry per recipe file; a recipe that does not validate here (e.g. its step is not
    registered yet) is an entry that says why."""
    from compressor.recipe import Recipe, RecipeError

    entries = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            recipe = Recipe.from_yaml(path)
        except RecipeError as error:
            entries.append(Entry("compressor", path.name, error=f"not run: {error}"))
            continue
        entries.append(
            Entry("compressor " + "+".join(step.name for step in recipe.steps), path.name, recipe_runner(recipe))
        )
    return entries


def recipe_runner(recipe):
    def run(model, work, settings):
        import copy

        from transformers import AutoConfig

        from compressor import apply
        from compressor.model import checkpoint_dtype

        chosen = copy.deepcopy(recipe)
        if settings.calibration_samples is not None:
            chosen.calibration.samples = settings.calibration_samples
        if settings.calibration_seq_len is not None:
            chosen.calibration.seq_len = settings.calibration_seq_len
        if settings.calibration is not None:
            chosen.calibration.dataset = settings.calibration
        out = work / "out"
        report = apply(chosen, model, out, progress=False)
        bits = report.summary.get("bits_per_weight") or dtype_bits(checkpoint_dtype(AutoConfig.from_pretrained(out)))
        notes = (
            [f"calibration {chosen.calibration.samples}x{chosen.calibration.seq_len}"]
            if chosen.needs_calibration
            else []
        )
        notes += activation_notes(out)
        if report.summary.get("format") == "compressed-tensors" and abs(ct_bits_per_weight(out) - bits) > 1e-3:
            notes.append(f"{ct_bits_per_weight(out):.3f} bits/weight as stored on disk; the report counts differently")
        return Compressed(bits, report.summary["size_bytes"], path=out, notes=notes)

    return run


def activation_notes(out: Path) -> list[str]:
    """W+A exports (QLLM, RTN with activation_bits): the activation bits, which bits/weight does not show."""
    config = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    bits = sorted(
        {
            entry["input_activations"]["num_bits"]
            for entry in (config.get("modules") or {}).values()
            if entry.get("input_activations")
        }
    )
    if not bits:
        return []
    operands = ", attention Q/K/V too" if config.get("attention_activations") else ""
    mapped = ", channel reassembly" if any(entry.get("input_map") for entry in config["modules"].values()) else ""
    return [f"activations {'/'.join(map(str, bits))}-bit per token{operands}{mapped}"]


# ----------------------------------------------------------------------------------------------
# Peers


def calibration_batch(model: str, settings: Settings):
    """The calibration tokens our recipes would draw, for peers that calibrate."""
    from transformers import AutoTokenizer

    from compressor.calibration import calibration_tokens
    from compressor.model import resolve_model_path
    from compressor.recipe import CalibrationConfig

    config = CalibrationConfig()
    if settings.calibration is not None:
        config.dataset = settings.calibration
    if settings.calibration_samples is not None:
        config.samples = settings.calibration_samples
    if settings.calibration_seq_len is not None:
        config.seq_len = settings.calibration_seq_len
    return calibration_tokens(AutoTokenizer.from_pretrained(resolve_model_path(model)), config)


@functools.cache
def llmcompressor_version(python: str) -> tuple[str | None, str | None]:
    """(version, None) when ``python`` can import llmcompressor, else (None, why not)."""
    probe = subprocess.run(
        [python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
        capture_output=True,
        text=True,
        env=offline_env(),
    )
    if probe.returncode == 0:
        return probe.stdout.strip().splitlines()[-1], None
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return None, (
        f"not run: llmcompressor is not importable by {python} ({last}); it pins older transformers and "
        "compressed-tensors than ours, so install it in its own venv and pass --llmcompressor-python"
    )


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def llmcompressor_entries(settings: Settings) -> list[Entry]:
    version, why_not = llmcompressor_version(settings.llmcompressor_python)
    entries = []
    for algorithm in ("gptq", "awq"):
        for bits, group_size, symmetric in GPTQ_SCHEMES:
            scheme = f"W{bits} g{group_size} {'sym' if symmetric else 'asym'}"
            method = f"llm-compressor {version} {algorithm}" if version else f"llm-compressor {algorithm}"
            runner = llmcompressor_runner(algorithm, bits, group_size, symmetric)
            entries.append(Entry(method, scheme, runner, error=why_not))
    return entries


def llmcompressor_runner(algorithm: str, bits: int, group_size: int, symmetric: bool):
    def run(model, work, settings):
        import torch

        from compressor.model import resolve_model_path

        tokens = calibration_batch(model, settings)
        torch.save(tokens, work / "calibration.pt")
        spec = {
            "model": str(resolve_model_path(model)),
            "output": str(work / "out"),
            "calibration": str(work / "calibration.pt"),
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "algorithm": algorithm,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        done = subprocess.run(
            [
                settings.llmcompressor_python,
                str(Path(__file__).with_name("llmcompressor_worker.py")),
                str(work / "spec.json"),
            ],
            capture_output=True,
            text=True,
            env=offline_env(),
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"the llm-compressor worker failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
            )
        worker = json.loads(done.stdout.strip().splitlines()[-1])
        out = work / "out"
        return Compressed(
            ct_bits_per_weight(out),
            safetensors_size(out),
            path=out,
            peak_gib=worker["peak_rss_gib"],
            notes=[f"calibration {tokens.shape[0]}x{tokens.shape[1]}, {worker['settings']}"],
        )

    return run


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def hqq_entries() -> list[Entry]:
    version = package_version("hqq")
    why_not = None if version else "not run: the hqq package is not installed (pip install hqq)"
    return [
        Entry(f"hqq {version or ''}".strip(), f"W{bits} g{group} asym", hqq_runner(bits, group), error=why_not)
        for bits, group in HQQ_SCHEMES
    ]


def hqq_runner(bits: int, group_size: int):
    def run(model, work, settings):
        import torch
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
        from hqq.models.hf.base import AutoHQQHFModel

        from compressor.eval import load_causal_lm

        loaded, _ = load_causal_lm(model)
        meta_dtype = stored_dtype(model)  # HQQ keeps its scales and zeros (and the other layers) in this dtype
        if meta_dtype == torch.float32:
            meta_dtype = torch.float16
        AutoHQQHFModel.quantize_model(
            loaded,
            quant_config=BaseQuantizeConfig(nbits=bits, group_size=group_size),
            compute_dtype=meta_dtype,
            device="cpu",
        )
        AutoHQQHFModel.save_quantized(loaded, str(work / "out"))
        size = sum(f.stat().st_size for f in (work / "out").iterdir())
        stored = weights = 0
        for module in loaded.modules():
            if isinstance(module, HQQLinear):
                weights += module.meta["shape"][0] * module.meta["shape"][1]
                for tensor in (module.W_q, module.meta["scale"], module.meta["zero"]):
                    stored += tensor.numel() * tensor.element_size() * 8
                # evaluate in fp32 like every other entry, from the values as stored
                module.meta["scale"], module.meta["zero"] = module.meta["scale"].float(), module.meta["zero"].float()
                module.compute_dtype = torch.float32
            else:
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.float()
        return Compressed(
            stored / weights,
            size,
            model=loaded,
            notes=[f"scales and zeros in {str(meta_dtype).removeprefix('torch.')}"],
        )

    return run


def torchao_entries() -> list[Entry]:
    version = package_version("torchao")
    method = f"torchao {version or ''}".strip()
    why_not = None if version else "not run: the torchao package is not installed (pip install torchao)"
    return [
        Entry(method, "Int4WeightOnlyConfig g128", torchao_runner("int4"), error=why_not),
        Entry(method, "IntxWeightOnlyConfig int4 g128", torchao_runner("intx"), error=why_not),
    ]


def torchao_runner(kind: str):
    def run(model, work, settings):
        import torch
        from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        from compressor.eval import load_causal_lm

        loaded, _ = load_causal_lm(model)
        scale_dtype = stored_dtype(model)
        if kind == "int4":  # torchao's int4 weight-only (packed int4 layouts); it may need CUDA kernels
            config = Int4WeightOnlyConfig(group_size=128)
        else:  # the int4 weight-only path that runs on CPUs: values in int8 storage
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128), scale_dtype=scale_dtype)
        block_linears = lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head"  # noqa: E731
        try:
            quantize_(loaded, config, filter_fn=block_linears)
            with torch.no_grad():  # fail here, not in the evaluation, when the layout cannot run on this device
                loaded(torch.zeros(1, 8, dtype=torch.long))
        except (ImportError, NotImplementedError, AssertionError, ValueError, RuntimeError) as error:
            raise CannotRunHere(
                f"{type(config).__name__} does not run on this machine's CPU ({one_line(error)})"
            ) from None
        # saved with the unquantized tensors in the checkpoint dtype, as every other entry stores them
        state = {
            k: v.to(scale_dtype) if type(v) in (torch.Tensor, torch.nn.Parameter) and v.is_floating_point() else v
            for k, v in loaded.state_dict().items()
        }
        torch.save(state, work / "model.pt")
        stored = weights = 0
        for name, module in loaded.named_modules():
            if block_linears(module, name):
                weight = module.weight
                weights += weight.shape[0] * weight.shape[1]
                for tensor_name in weight.__tensor_flatten__()[0]:
                    tensor = getattr(weight, tensor_name)
                    stored += tensor.numel() * tensor.element_size() * 8
        notes = ["int4 values held one per int8 byte (no packed int4 CPU layout)"] if kind == "intx" else []
        return Compressed(stored / weights, (work / "model.pt").stat().st_size, model=loaded, notes=notes)

    return run


def default_entries(settings: Settings) -> list[Entry]:
    return [fp_entry(), *recipe_entries(), *llmcompressor_entries(settings), *hqq_entries(), *torchao_entries()]


# ----------------------------------------------------------------------------------------------
# Running


def run_entry(entry: Entry, model: str, windows, settings: Settings, work: Path) -> dict:
    from compressor import kvcache
    from compressor.eval import evaluate, load_causal_lm

    row = {"method": entry.method, "recipe": entry.recipe, "model": model}
    if entry.error:
        return {**row, "error": entry.error}
    print(f"[quality] {model}: {entry.method} {entry.recipe}", file=sys.stderr, flush=True)
    try:
        reset_peak_memory()
        start = time.perf_counter()
        compressed = entry.compress(model, work, settings)
        seconds = time.perf_counter() - start
        peak = compressed.peak_gib if compressed.peak_gib is not None else peak_memory_gib()
        loaded = compressed.model if compressed.model is not None else load_causal_lm(str(compressed.path))[0]
        result = evaluate(loaded, windows, load_causal_lm(model)[0])
        kv_cache = kvcache.summary(loaded)
        if kv_cache is not None:  # a quantized KV cache (BFP): bits/weight are the weights'; the cache has its own size
            values = "V fp" if kv_cache["v_bits"] is None else f"V {kv_cache['v_bits']}-bit"
            compressed.notes.append(
                f"KV cache: K {kv_cache['k_bits']}-bit BFP block {kv_cache['block_size']}, {values}; "
                f"K {kv_cache['k_bytes_per_token']} B/token = {kv_cache['k_ratio']:.3f}x bf16"
            )
    except CannotRunHere as error:
        return {**row, "error": f"not run: {error}"}
    except Exception as error:  # a benchmark reports a failing entry and goes on
        traceback.print_exc()
        return {**row, "error": f"failed: {one_line(error)}"}
    print(
        f"[quality] {model}: {entry.method} {entry.recipe}: KL {result.kl_divergence:.6f}, perplexity "
        f"{result.perplexity:.3f}, {seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return {
        **row,
        "bits_per_weight": compressed.bits_per_weight,
        "size_bytes": compressed.size_bytes,
        "perplexity": result.perplexity,
        "base_perplexity": result.base_perplexity,
        "gap": result.perplexity_gap,
        "kl": result.kl_divergence,
        "seconds": seconds if entry.method != "fp" else None,
        "peak_memory_gib": peak if entry.method != "fp" else None,
        "windows": result.windows,
        "tokens": result.tokens,
        "kv_cache": kv_cache,
        "notes": compressed.notes,
    }


def run_benchmark(models: list[str], entries: list[Entry], settings: Settings) -> list[dict]:
    """Every entry on every model; the held-out windows are built once per model."""
    from transformers import AutoTokenizer

    from compressor.eval import heldout_stream, make_windows
    from compressor.model import resolve_model_path

    rows = []
    for model in models:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        windows = make_windows(heldout_stream(tokenizer, settings.text), settings.seq_len, settings.max_windows)
        for entry in entries:
            with tempfile.TemporaryDirectory(prefix="quality-") as work:
                rows.append(run_entry(entry, model, windows, settings, Path(work)))
    return rows


def compare_gptq_with_rtn(rows: list[dict]) -> None:
    """GPTQ should beat RTN at the same scheme; where it does not, its row says so."""
    for gptq in rows:
        if "gptq" not in gptq["method"] or gptq.get("perplexity") is None:
            continue
        for rtn in rows:
            same = (
                rtn["model"] == gptq["model"]
                and rtn["method"] == "compressor rtn"
                and rtn.get("bits_per_weight") == gptq["bits_per_weight"]
            )
            if same and rtn.get("perplexity") is not None and gptq["perplexity"] >= rtn["perplexity"]:
                gptq["notes"].append(
                    f"not better than RTN {rtn['recipe']} at the same size "
                    f"({gptq['perplexity']:.3f} vs {rtn['perplexity']:.3f})"
                )


# ----------------------------------------------------------------------------------------------
# Output: JSON (the record), markdown table, plot


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"
    )


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in record["rows"]))
    figure, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 5.5), squeeze=False)
    markers = "osD^vP*Xh<>"
    methods = list(dict.fromkeys(row["method"] for row in record["rows"]))
    for axis, model in zip(axes[0], models):
        for row in record["rows"]:
            if row["model"] == model and row["method"] == "fp" and not row.get("error"):
                axis.axhline(
                    row["perplexity"],
                    color="gray",
                    linestyle="--",
                    linewidth=1,
                    label=f"fp ({row['bits_per_weight']:g} bits)",
                )
        for index, method in enumerate(m for m in methods if m != "fp"):
            points = sorted(
                (r["bits_per_weight"], r["perplexity"])
                for r in record["rows"]
                if r["model"] == model and r["method"] == method and not r.get("error")
            )
            if points:
                axis.plot(*zip(*points), marker=markers[index % len(markers)], label=method, alpha=0.85)
        axis.set_xlabel("bits per weight (codes + scales + zero points)")
        axis.set_ylabel("perplexity on held-out text (log scale)")
        axis.set_yscale("log")
        axis.set_title(f"model {model}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Perplexity against bits per weight, {record['date']}\n{record['machine']}", fontsize=9)
    figure.text(0.01, 0.01, textwrap.fill(record["command"], 110 * len(models)), fontsize=8, family="monospace")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(record: dict, folder: Path = RESULTS) -> list[Path]:
    """``quality-<date>.json``, ``.md`` and, with matplotlib installed, ``.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"quality-{record['date']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    markdown = f"# Quality benchmark, {record['date']}\n\n{describe(record)}\n\n{markdown_table(record)}"
    try:
        plot(record, stem.with_suffix(".png"))
        paths.append(stem.with_suffix(".png"))
        markdown += f"\n![perplexity against bits per weight]({stem.name}.png)\n"
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    paths[1].write_text(markdown)
    return paths


def weights_digest(model: str) -> str:
    import hashlib

    from compressor.model import resolve_model_path

    digest = hashlib.sha256()
    for file in sorted(resolve_model_path(model).glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def make_record(models: list[str], rows: list[dict], settings: Settings, command: str, versions: dict) -> dict:
    windows = sorted({row["windows"] for row in rows if row.get("windows")})
    return {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "model": ", ".join(models),
        "model_sha256": {model: weights_digest(model) for model in models},  # which checkpoint was measured
        "eval": {
            "text": settings.text,
            "seq_len": settings.seq_len,
            "max_windows": settings.max_windows,
            "windows": windows[0] if len(windows) == 1 else windows,
        },
        "calibration": {
            "text": settings.calibration,
            "samples": settings.calibration_samples,
            "seq_len": settings.calibration_seq_len,
        },
        "python": sys.executable,
        "versions": versions,
        "rows": sorted(rows, key=sort_key),
    }


def carry_over(previous: dict, record: dict) -> dict:
    """``record`` plus the rows of ``previous`` it did not measure again (``--update``): a new method's rows
    join the table without re-running every other entry. Refused unless both were measured the same way on
    the same weights; each row keeps the date it was measured, and the record its history of commands."""

    def settings(r):
        return (
            r["eval"]["text"],
            r["eval"]["seq_len"],
            r["eval"]["max_windows"],
            r["calibration"],
        )  # not "windows": rows may differ

    if settings(previous) != settings(record):
        raise SystemExit(
            f"--update: the newest record ({previous['date']}) used other settings {settings(previous)} than this run "
            f"{settings(record)}; run it again with those, or without --update"
        )
    for model, digest in record["model_sha256"].items():
        if previous["model_sha256"].get(model, digest) != digest:
            raise SystemExit(
                f"--update: model {model} has other weights than in the record of {previous['date']}; "
                "run every entry again"
            )
    history = previous.get("history") or [
        {"command": previous["command"], "date": previous["date"], "machine": previous["machine"]}
    ]
    fresh = {(r["model"], r["method"], r["recipe"]) for r in record["rows"]}
    kept = [
        {**r, "measured": r.get("measured", previous["date"])}
        for r in previous["rows"]
        if (r["model"], r["method"], r["recipe"]) not in fresh
    ]
    rows = kept + [{**r, "measured": record["date"]} for r in record["rows"]]
    models = list(dict.fromkeys([*previous["model"].split(", "), *record["model"].split(", ")]))
    return {
        **record,
        "model": ", ".join(models),
        "model_sha256": {**previous["model_sha256"], **record["model_sha256"]},
        "history": history + [{"command": record["command"], "date": record["date"], "machine": record["machine"]}],
        "rows": sorted(rows, key=sort_key),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="'demo' (default), a local folder or a hub id; repeatable")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 windows and 32 calibration samples: the demo model in ~20 minutes on 2 cores",
    )
    parser.add_argument(
        "--only", action="append", help="run only entries whose method or recipe contains this text; repeatable"
    )
    parser.add_argument("--text", default="demo", help="held-out text: 'demo', a local file or folder")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument(
        "--calibration",
        help="calibration text for every calibrated entry (default: each recipe's own; 'demo' for GPTQ)",
    )
    parser.add_argument("--calibration-samples", type=int)
    parser.add_argument(
        "--llmcompressor-python",
        default=sys.executable,
        help="interpreter that has llmcompressor (it pins other library versions)",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of the newest quality-*.json in --output-dir that this run does not measure again "
        "(same evaluation and calibration settings, same model weights); each row keeps its date",
    )
    args = parser.parse_args(argv)
    os.environ.update({key: "1" for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")})
    settings = Settings(
        text=args.text,
        seq_len=args.seq_len,
        calibration=args.calibration,
        llmcompressor_python=args.llmcompressor_python,
        max_windows=args.max_windows if args.max_windows is not None else (32 if args.quick else None),
        calibration_samples=args.calibration_samples
        if args.calibration_samples is not None
        else (32 if args.quick else None),
    )
    models = args.model or ["demo"]
    entries = default_entries(settings)
    if args.only:
        entries = [e for e in entries if any(text in f"{e.method} {e.recipe}" for text in args.only)]
    rows = run_benchmark(models, entries, settings)
    compare_gptq_with_rtn(rows)
    versions = {
        name: package_version(name)
        for name in ("compressor", "torch", "transformers", "compressed-tensors", "hqq", "torchao")
    }
    versions["llmcompressor"] = llmcompressor_version(settings.llmcompressor_python)[0]
    command = "python benchmarks/quality.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    record = make_record(models, rows, settings, command, versions)
    if args.update:
        previous = sorted(args.output_dir.glob("quality-*.json"))
        record = carry_over(json.loads(previous[-1].read_text()), record) if previous else record
    paths = write_outputs(record, args.output_dir)
    print(markdown_table(record))
    print("wrote " + ", ".join(str(p) for p in paths) + "; refresh docs/QUALITY.md with python scripts/update_docs.py")


if __name__ == "__main__":
    main()
