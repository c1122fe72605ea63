"""``compressor validate``: do an exported checkpoint's Triton kernels compute what the reference
computes, and (on a GPU) how fast does the model run compared with the same model in fp16?

Three checks, in order:

1. every ``QuantizedLinear`` layer: the Triton kernel against the fp32 ground truth
   (``kernels.exact_linear``) on random activations for every schedule (decode on CUDA cores and
   on tensor cores, gemm and, on a GPU, dequantize + cuBLAS); max absolute error and max error
   relative to the largest output, against a per-dtype tolerance;
2. perplexity on a little held-out text through both paths (Triton, torch reference): they must
   agree to ``PPL_TOLERANCE``;
3. GPU only: decode and prefill tokens/s of the quantized model against the same model with every
   quantized linear replaced by its dequantized fp16/bf16 ``nn.Linear``.

On a CPU there is no speed to measure: the kernels run in the Triton interpreter (switched on here
if the kernels were not imported yet), the report says that only correctness was checked, and
the per-layer check is capped (``max_layers``) because the interpreter is slow.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# output error / max|output| allowed per activation dtype (kernels.md section 8, with headroom for K
# in the thousands: fp16 and bf16 round the dequantized weight to the tl.dot operand type)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
PPL_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative difference
CPU_PPL_MAX_PARAMS = 50_000_000  # CPU: beyond this the interpreter takes too long for a forward pass
CPU_MAX_LAYERS = 16  # CPU: layers checked by default
CPU_ROWS = 128  # CPU: output rows of each layer checked (the full K, so every group and word is read)

FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a "
    "wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters. The sea was calm that morning, and the ships in the harbour "
    "rode quietly at anchor while the town woke up around them. "
) * 4


def kernels_runnable(device: torch.device) -> tuple[bool, str]:
    """Can the Triton kernels run in this process on ``device``?

    On a CPU only in interpreter mode, which Triton fixes when it is first imported (its own
    ``tl.sum`` & co. are compiled-mode functions otherwise), so ``TRITON_INTERPRET=1`` must be set
    before anything imports triton; ``validate_checkpoint`` starts a subprocess that does this.
    """
    from compressor.kernels import triton_available

    if not triton_available():
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "triton (CUDA)"
    from compressor.kernels import codes

    if codes.INTERPRETED:
        return True, "triton interpreter (CPU)"
    return False, "no CUDA device and TRITON_INTERPRET=1 was not set before triton was imported"


def _layer_batches(device: torch.device) -> tuple[int, ...]:
    from compressor.kernels.heuristics import DEQUANT_MIN_M

    if device.type == "cuda":
        return (1, 16, 40, DEQUANT_MIN_M + 7)  # decode (CUDA cores), decode (tl.dot), gemm, dequantize + cuBLAS
    return (1, 3, 17)


@torch.no_grad()
def check_layers(model, dtype, device, max_layers=None, batches=None, seed=0, row_limit=None) -> list[dict]:
    """Kernel vs fp32 ground truth on random activations, one row per quantized layer (only its
    first ``row_limit`` output rows when given: the interpreter is slow on full-size layers)."""
    from compressor.kernels import exact_linear, triton_linear
    from compressor.modules.linear import QuantizedLinear

    batches = batches or _layer_batches(device)
    tolerance = TOLERANCE[dtype]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name, module in layers[: max_layers if max_layers is not None else len(layers)]:
        weight, bias = module.quantized_weight, module.bias
        if row_limit is not None and weight.shape[0] > row_limit:
            weight, bias = weight.rows(slice(0, row_limit)), None if bias is None else bias[:row_limit]
        errors = {}
        for m in batches:
            x = torch.randn(m, module.in_features, generator=generator).to(device=device, dtype=dtype)
            expected = exact_linear(x, weight, bias)
            got = triton_linear(x, weight, bias).float()
            abs_err = (got - expected).abs().max().item()
            errors[m] = {"max_abs": abs_err, "max_rel": abs_err / max(expected.abs().max().item(), 1e-30)}
        worst = max(e["max_rel"] for e in errors.values())
        rows.append(
            {
                "name": name,
                "kind": weight.kind,
                "shape": list(module.quantized_weight.shape),
                "rows_checked": weight.shape[0],
                "bits": getattr(weight, "bits", None),
                "errors": errors,
                "max_rel": worst,
                "max_abs": max(e["max_abs"] for e in errors.values()),
                "tolerance": tolerance,
                "ok": bool(worst <= tolerance and math.isfinite(worst)),
            }
        )
    return rows


def compare_perplexity(model, windows: torch.Tensor, dtype) -> dict:
    """Perplexity through the Triton kernels and through the torch reference on the same windows."""
    from compressor.eval import evaluate
    from compressor.kernels import use_backend

    with use_backend("triton"):
        triton_ppl = evaluate(model, windows).perplexity
    with use_backend("reference"):
        reference = evaluate(model, windows)
    diff = abs(triton_ppl - reference.perplexity) / reference.perplexity
    return {
        "triton": triton_ppl,
        "reference": reference.perplexity,
        "rel_diff": diff,
        "tokens": reference.tokens,
        "windows": reference.windows,
        "tolerance": PPL_TOLERANCE[dtype],
        "ok": bool(diff <= PPL_TOLERANCE[dtype]),
    }


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: compiles and autotunes
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def measure_speed(model, vocab_size: int, device, prompt_len=16, new_tokens=64, prefill_len=512, repeats=3) -> dict:
    """Decode tokens/s (batch 1, greedy, ``new_tokens`` after a ``prompt_len`` prompt) and prefill
    tokens/s (one forward over ``prefill_len`` tokens)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=generator).to(device)
    long_input = torch.randint(0, vocab_size, (1, prefill_len), generator=generator).to(device)

    def decode():
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(prompt),
        )

    decode_s = _timed(decode, repeats)
    prefill_s = _timed(lambda: model(long_input), repeats)
    return {
        "decode_tok_s": new_tokens / decode_s,
        "prefill_tok_s": prefill_len / prefill_s,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_len": prefill_len,
    }


def validate_model(
    model,
    windows: torch.Tensor | None,
    *,
    device=None,
    max_layers=None,
    batches=None,
    speed: bool | None = None,
    seed: int = 0,
) -> dict:
    """The checks of ``validate_checkpoint`` on a model already holding ``QuantizedLinear`` layers."""
    from compressor.modules.linear import QuantizedLinear, dequantize_model_

    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    dtype = parameter.dtype
    on_gpu = device.type == "cuda"
    runnable, backend = kernels_runnable(device)
    layers_total = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "quantized_layers": layers_total,
        "layers": [],
        "perplexity": None,
        "speed": None,
        "correctness_only": not on_gpu,
        "notes": [],
    }
    if layers_total == 0:
        result["notes"].append("no quantized layers: nothing to validate")
    if not runnable:
        result["notes"].append(f"Triton kernels could not run ({backend}): nothing was checked")
        result["ok"] = False
        return result
    if not on_gpu:
        result["notes"].append(
            "no GPU: the kernels ran in the Triton interpreter; only correctness was checked, no speed was measured"
        )
        max_layers = CPU_MAX_LAYERS if max_layers is None else max_layers
    row_limit = None if on_gpu else CPU_ROWS
    result["layers"] = check_layers(model, dtype, device, max_layers, batches, seed, row_limit)
    if len(result["layers"]) < layers_total:
        result["notes"].append(f"checked {len(result['layers'])} of {layers_total} quantized layers (max_layers)")
    if any(row["rows_checked"] < row["shape"][0] for row in result["layers"]):
        result["notes"].append(f"the interpreter checked the first {CPU_ROWS} output rows of the larger layers")

    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if windows is not None and (on_gpu or params <= CPU_PPL_MAX_PARAMS):
        result["perplexity"] = compare_perplexity(model, windows, dtype)
    elif windows is not None:
        result["notes"].append(
            f"perplexity through the interpreter skipped: {params / 1e6:.0f}M parameters is too slow on a CPU"
        )

    if speed if speed is not None else on_gpu:
        vocab = model.config.vocab_size
        quantized = measure_speed(model, vocab, device)
        dequantize_model_(model, dtype)
        torch.cuda.empty_cache()
        dense = measure_speed(model, vocab, device)
        result["speed"] = {
            "quantized": quantized,
            "dense": dense,
            "decode_speedup": quantized["decode_tok_s"] / dense["decode_tok_s"],
            "prefill_speedup": quantized["prefill_tok_s"] / dense["prefill_tok_s"],
        }
        result["notes"].append("the model was dequantized in place for the dense timing")
    checks = [row["ok"] for row in result["layers"]] + ([result["perplexity"]["ok"]] if result["perplexity"] else [])
    result["ok"] = all(checks)
    return result


def _model_dtype(path: Path, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32  # CPU: fp32 is the fast dtype and what the interpreter handles best
    config = json.loads((path / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float16"
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def validate_checkpoint(
    path,
    device=None,
    *,
    dtype: torch.dtype | None = None,
    text: str = "demo",
    seq_len: int = 128,
    max_windows: int = 2,
    max_layers: int | None = None,
    speed: bool | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    """Load an exported checkpoint into ``QuantizedLinear`` modules and run the three checks.

    ``text``: held-out text for the perplexity check (``demo``, a .txt file or a dataset source as in
    ``compressor eval``); a short built-in passage when the demo text is not installed.
    """
    from transformers import AutoTokenizer

    from compressor.eval import heldout_stream, make_windows
    from compressor.export import load_quantized_model

    path = Path(path)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cpu" and not kernels_runnable(device)[0] and os.environ.get("TRITON_INTERPRET") != "1":
        options = dict(
            dtype=dtype,
            text=text,
            seq_len=seq_len,
            max_windows=max_windows,
            max_layers=max_layers,
            speed=speed,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        return _validate_in_interpreter(path, options)
    from compressor.model import transformers_says

    with transformers_says(path):
        dtype = dtype or _model_dtype(path, device)
        model = load_quantized_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    text_note = None
    try:
        stream = heldout_stream(tokenizer, text)
    except FileNotFoundError:
        from compressor.calibration import tokenize_stream

        stream, text_note = (
            tokenize_stream(tokenizer, [FALLBACK_TEXT]),
            f"held-out text {text!r} not found; used a built-in passage",
        )
    seq_len = min(seq_len, stream.numel())
    windows = make_windows(stream, seq_len, max_windows)
    result = validate_model(model, windows, device=device, max_layers=max_layers, speed=speed, seed=seed)
    result["path"] = str(path)
    if text_note:
        result["notes"].append(text_note)
    return result


def format_validation_report(result: dict) -> str:
    """The human-readable report printed by ``compressor validate``."""
    lines = [f"compressor validate {result.get('path', '')}".rstrip()]
    lines.append(f"device: {result['device']}, dtype {result['dtype']}, kernels: {result['backend']}")
    if result["correctness_only"]:
        lines.append("NOTE: no GPU - only correctness was checked; there are no speed numbers.")
    layers = result["layers"]
    if layers:
        worst = max(layers, key=lambda row: row["max_rel"])
        failed = [row for row in layers if not row["ok"]]
        batches = sorted({int(m) for row in layers for m in row["errors"]})
        lines.append(
            f"kernels vs fp32 reference: {len(layers)} of {result['quantized_layers']} layers, M in {batches}; worst "
            f"max error/max|y| {worst['max_rel']:.2e} ({worst['name']}), tolerance {worst['tolerance']:.0e}: "
            + ("OK" if not failed else f"{len(failed)} FAILED")
        )
        shown = failed or sorted(layers, key=lambda row: -row["max_rel"])[:8]
        lines.append(f"  {'layer':<44} {'kind':<16} {'N x K':>13} {'bits':>4} {'max rel':>9} {'max abs':>9}")
        for row in shown:
            shape = "x".join(str(d) for d in row["shape"])
            lines.append(
                f"  {row['name'][-44:]:<44} {row['kind']:<16} {shape:>13} {row['bits'] or '':>4} "
                f"{row['max_rel']:>9.2e} {row['max_abs']:>9.2e}" + ("" if row["ok"] else "  FAILED")
            )
        if not failed and len(layers) > len(shown):
            lines.append(f"  ... {len(layers) - len(shown)} more layers, all within tolerance")
    ppl = result["perplexity"]
    if ppl:
        lines.append(
            f"perplexity on {ppl['windows']} held-out windows ({ppl['tokens']} predicted tokens): triton "
            f"{ppl['triton']:.4f}, reference {ppl['reference']:.4f}, relative difference {ppl['rel_diff']:.1e} "
            f"(tolerance {ppl['tolerance']:.0e}): " + ("OK" if ppl["ok"] else "FAILED")
        )
    speed = result["speed"]
    if speed:
        q, d = speed["quantized"], speed["dense"]
        lines.append(
            f"decode (batch 1, {q['new_tokens']} new tokens): quantized {q['decode_tok_s']:.1f} tok/s, dense "
            f"{d['decode_tok_s']:.1f} tok/s, speedup {speed['decode_speedup']:.2f}x"
        )
        lines.append(
            f"prefill ({q['prefill_len']} tokens): quantized {q['prefill_tok_s']:.0f} tok/s, dense "
            f"{d['prefill_tok_s']:.0f} tok/s, speedup {speed['prefill_speedup']:.2f}x"
        )
    for note in result["notes"]:
        lines.append(f"note: {note}")
    lines.append("result: " + ("OK" if result.get("ok") else "FAILED"))
    return "\n".join(lines)


def _validate_in_interpreter(path: Path, options: dict) -> dict:
    """Run ``validate_checkpoint`` on the CPU in a fresh process with ``TRITON_INTERPRET=1``."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "compressor.validate",
            str(path),
            "--json",
            str(out),
            "--options",
            json.dumps(
                {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in options.items()}
            ),
        ]
        done = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"validation in the Triton interpreter failed ({last})")
        result = json.loads(out.read_text())
        if "user_error" in result:  # the child's one-line refusal, said as ours
            from compressor.errors import UserError

            raise UserError(result["user_error"])
    result["notes"].append("ran in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    return result


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="validate_checkpoint on the CPU (used with TRITON_INTERPRET=1)")
    parser.add_argument("path")
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--options", default="{}", help="validate_checkpoint keyword arguments as JSON")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    if options.get("dtype"):
        options["dtype"] = getattr(torch, options["dtype"])
    from compressor.errors import UserError

    try:
        result = validate_checkpoint(args.path, "cpu", **options)
    except UserError as error:
        result = {"user_error": str(error)}
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
