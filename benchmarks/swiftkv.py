"""SwiftKV on the demo model, in one run: quality before and after distillation, prefill speed, KV cache.

    python benchmarks/swiftkv.py            # the recipes as written, 32 held-out windows
    python benchmarks/swiftkv.py --quick    # the recipes as written, 8 held-out windows

For each SwiftKV recipe (``recipes/swiftkv-50*.yaml``) two rows: the step with ``epochs: 0`` (the
official initialisation, before distillation) and the recipe as written (the AcrossKV one only with
``--all``: on two shared CPU cores each distillation takes about 20 minutes). Each is ``compressor.apply``'d,
loaded back with ``compressor.eval.load_causal_lm`` (after ``import compressor``, no remote code) and
scored on the same held-out windows as the fp model by ``compressor.eval.evaluate`` (perplexity, gap,
mean per-token KL from the original; every token needs its logits there, so nothing is skipped).

KV bytes per token are counted from the cache a prefill of the long prompt filled (fp32, as loaded on
the CPU), for the original and each export. Prefill time: one forward of a ``--prompt``-token prompt
with ``use_cache=True`` and ``logits_to_keep=1`` (what ``generate`` asks for, so the SwiftKV model runs its
upper layers on the last token only), median of ``--repeats`` runs, the original and the distilled
SwiftKV models timed alternately in the same process. Writes
``benchmarks/results/swiftkv/swiftkv-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from compressor import Recipe, apply  # noqa: E402
from compressor.arch.swiftkv import kv_cache_bytes  # noqa: E402
from compressor.eval import evaluate, heldout_stream, load_causal_lm, make_windows  # noqa: E402

RECIPES = ["swiftkv-50.yaml", "swiftkv-50-across2.yaml"]


@torch.no_grad()
def prefill_seconds(model, prompt: torch.Tensor) -> float:
    started = time.perf_counter()
    model(prompt, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started


@torch.no_grad()
def kv_bytes_per_token(model, prompt: torch.Tensor) -> float:
    cache = DynamicCache(config=model.config)
    model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    return kv_cache_bytes(cache) / prompt.shape[1]


def seconds_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s"


def time_alternately(models: dict, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median prefill seconds of each model, the models taking turns (one warm-up run each)."""
    times = {name: [] for name in models}
    for model in models.values():
        prefill_seconds(model, prompt)
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(prefill_seconds(model, prompt))
    return {name: statistics.median(values) for name, values in times.items()}


def markdown(record: dict) -> str:
    """The results page of one run (``record`` as written to the JSON)."""
    rows, speed = record["rows"], record["prefill"]
    lines = [
        f"# SwiftKV on `{record['model']}` ({record['date']})",
        "",
        f"Command: `{record['command']}` (machine: {record['machine']}). "
        f"{record['windows']} held-out windows of 512 tokens; "
        "perplexity and mean per-token KL from the original by `compressor.eval.evaluate` "
        "(every token's logits: no skipping). "
        f"KV bytes per token counted from the cache a {speed['prompt_tokens']}-token prefill filled (fp32).",
        "",
        "| entry | recipe | perplexity | gap | KL | KL / before distillation | KV bytes/token | "
        "KV vs fp (configured) | held-out KL curve (trainer, top-k) | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    before = {}
    for r in rows:
        curve = " -> ".join(f"{v:.4f}" for v in r.get("heldout_curve") or []) or "-"
        configured = f" ({r['kv_ratio_configured']:.4f})" if "kv_ratio_configured" in r else ""
        setting = r["entry"].rsplit(",", 1)[0]
        if r["entry"].endswith("before distillation"):
            before[setting] = r["kl"]
        relative = (
            f"{r['kl'] / before[setting]:.3f}" if r["entry"].endswith("distilled") and before.get(setting) else "-"
        )
        lines.append(
            f"| {r['entry']} | {r['recipe']} | {r['perplexity']:.3f} | {r['gap']:+.3f} | {r['kl']:.6f} | {relative} | "
            f"{r['kv_bytes_per_token']:.0f} | {r['kv_ratio']:.4f}{configured} | {curve} | "
            f"{seconds_text(r['seconds'])} |"
        )
    lines += [
        "",
        f"Prefill of a {speed['prompt_tokens']}-token prompt (`use_cache=True, logits_to_keep=1`, batch 1, median of "
        f"{speed['repeats']}, alternating, {speed['threads']} threads): "
        f"original {speed['fp_seconds'] * 1e3:.1f} ms, "
        f"swiftkv-50 {speed['swiftkv_seconds'] * 1e3:.1f} ms: **{speed['speedup']:.2f}x**.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt", type=int, default=1024, help="tokens of the long prompt timed")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--all",
        action="store_true",
        help="also distil the AcrossKV recipe (by default only its initialisation "
        "is exported: the KV cache it fills does not depend on training)",
    )
    args = parser.parse_args()
    windows_count = 8 if args.quick else 32
    torch.manual_seed(0)

    base, tokenizer = load_causal_lm(args.model)
    stream = heldout_stream(tokenizer)
    windows = make_windows(stream, 512, windows_count)
    prompt = stream[: args.prompt][None]
    fp = evaluate(base, windows)
    base_kv = kv_bytes_per_token(base, prompt)
    rows = [
        {
            "entry": "fp",
            "recipe": "-",
            "perplexity": fp.perplexity,
            "gap": 0.0,
            "kl": 0.0,
            "kv_bytes_per_token": base_kv,
            "kv_ratio": 1.0,
            "seconds": None,
        }
    ]
    print(f"fp: perplexity {fp.perplexity:.3f}, KV {base_kv:.0f} bytes/token", flush=True)
    timed = {}
    with tempfile.TemporaryDirectory() as work:
        for name in RECIPES:
            recipe = Recipe.from_yaml(ROOT / "recipes" / name)
            variants = [("distilled", recipe)] if name == RECIPES[0] or args.all else []
            if len(recipe.steps) == 1:
                untrained = copy.deepcopy(recipe)
                untrained.steps[0].epochs = 0
                variants.insert(0, ("before distillation", untrained))
            for label, chosen in variants:
                out = Path(work) / f"{name}-{label.replace(' ', '-')}"
                started = time.perf_counter()
                report = apply(chosen, args.model, out, progress=False)
                seconds = time.perf_counter() - started
                model, _ = load_causal_lm(str(out))
                result = evaluate(model, windows, base)
                step = next(r for r in report.rows if r["step"] == "swiftkv")
                kv = kv_bytes_per_token(model, prompt)
                row = {
                    "entry": f"swiftkv M={step['num_key_value_layers']} G={step['key_value_group_size']}"
                    + (" + rtn w8" if len(recipe.steps) > 1 else "")
                    + f", {label}",
                    "recipe": name + (" (epochs: 0)" if label == "before distillation" else ""),
                    "perplexity": result.perplexity,
                    "gap": result.perplexity - fp.perplexity,
                    "kl": result.kl_divergence,
                    "kv_bytes_per_token": kv,
                    "kv_ratio": kv / base_kv,
                    "kv_ratio_configured": 1 - step["kv_cache_reduction"],
                    "seconds": seconds,
                    "heldout_curve": step.get("heldout_curve"),
                }
                rows.append(row)
                print(
                    f"{row['entry']}: perplexity {row['perplexity']:.3f} (gap {row['gap']:+.3f}, KL {row['kl']:.4f}), "
                    f"KV {kv:.0f} bytes/token ({row['kv_ratio']:.4f} of fp; "
                    f"configured {row['kv_ratio_configured']:.4f}), {seconds:.0f} s",
                    flush=True,
                )
                if name == "swiftkv-50.yaml" and label == "distilled":
                    timed["swiftkv"] = model
        timed = {"fp": base, **timed}
        medians = time_alternately(timed, prompt, args.repeats)
    speed = {
        "prompt_tokens": args.prompt,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "fp_seconds": medians["fp"],
        "swiftkv_seconds": medians["swiftkv"],
        "speedup": medians["fp"] / medians["swiftkv"],
    }
    print(
        f"prefill of {args.prompt} tokens: fp {medians['fp'] * 1e3:.1f} ms, "
        f"swiftkv-50 {medians['swiftkv'] * 1e3:.1f} ms, {speed['speedup']:.2f}x",
        flush=True,
    )

    command = "python benchmarks/swiftkv.py" + (" --quick" if args.quick else "") + (" --all" if args.all else "")
    record = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "model": args.model,
        "windows": len(windows),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "rows": rows,
        "prefill": speed,
    }
    folder = ROOT / "benchmarks" / "results" / "swiftkv"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"swiftkv-{record['date']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
