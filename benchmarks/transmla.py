"""TransMLA on the demo model: perplexity at KV-cache sizes 1/2, 1/4 and 1/8, before and after healing.

    python benchmarks/transmla.py            # 32 calibration samples x 512 tokens, 32 held-out windows
    python benchmarks/transmla.py --quick    # 16 samples x 256 tokens, 8 windows

Each row is ``compressor.apply`` of a recipe (``transmla`` alone, then ``transmla`` + ``transmla_heal``)
exported as a DeepSeek-V3 checkpoint, loaded back with plain ``AutoModelForCausalLM.from_pretrained``
and scored on the same held-out windows as the fp model by ``compressor.eval.evaluate``. The KV cache
per token is counted from the exported config (all layers; 2 bytes a number, the bf16 cache).
Writes ``benchmarks/results/transmla-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from compressor import Recipe, apply  # noqa: E402
from compressor.arch.deepseek_mla import kv_cache_elements_per_token  # noqa: E402
from compressor.eval import evaluate, heldout_stream, load_causal_lm, make_windows  # noqa: E402
from compressor.model import resolve_model_path  # noqa: E402

RATIOS = [("1/2", 0.5), ("1/4", 0.25), ("1/8", 0.125)]
CACHE_BYTES = 2  # a bf16 KV cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--heal-epochs", type=int, default=2)
    args = parser.parse_args()
    samples, seq_len, windows_count = (16, 256, 8) if args.quick else (32, 512, 32)
    torch.manual_seed(0)

    base, tokenizer = load_causal_lm(args.model)
    windows = make_windows(heldout_stream(tokenizer), 512, windows_count)
    fp = evaluate(base, windows)
    base_kv = kv_cache_elements_per_token(AutoConfig.from_pretrained(resolve_model_path(args.model)))
    rows = [
        {
            "entry": "fp (GQA)",
            "kv_cache_ratio": 1.0,
            "kv_bytes_per_token": base_kv * CACHE_BYTES,
            "kv_lora_rank": None,
            "qk_rope_head_dim": None,
            "perplexity": fp.perplexity,
            "gap": 0.0,
            "kl": 0.0,
            "seconds": None,
        }
    ]
    print(f"fp: perplexity {fp.perplexity:.3f}, KV {base_kv * CACHE_BYTES} bytes/token", flush=True)
    calibration = {"dataset": "demo", "samples": samples, "seq_len": seq_len}
    for label, ratio in RATIOS:
        for heal in (False, True):
            steps = [{"transmla": {"kv_cache_ratio": ratio}}]
            if heal:
                steps.append({"transmla_heal": {"epochs": args.heal_epochs}})
            recipe = Recipe.from_dict({"calibration": calibration, "steps": steps})
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                apply(recipe, args.model, Path(work) / "out", progress=False)
                seconds = time.perf_counter() - started
                model, _ = load_causal_lm(str(Path(work) / "out"))
                result = evaluate(model, windows, base)
                config = model.config
            kv = kv_cache_elements_per_token(config)
            row = {
                "entry": f"transmla {label}" + (" + heal" if heal else ""),
                "kv_cache_ratio": kv / base_kv,
                "kv_bytes_per_token": kv * CACHE_BYTES,
                "kv_lora_rank": config.kv_lora_rank,
                "qk_rope_head_dim": config.qk_rope_head_dim,
                "perplexity": result.perplexity,
                "gap": result.perplexity - fp.perplexity,
                "kl": result.kl_divergence,
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"{row['entry']}: perplexity {row['perplexity']:.3f} (gap {row['gap']:+.3f}, KL {row['kl']:.4f}), "
                f"KV {row['kv_bytes_per_token']} bytes/token, {seconds:.0f} s",
                flush=True,
            )

    command = "python benchmarks/transmla.py" + (" --quick" if args.quick else "")
    setting = (
        f"model `{args.model}`, {len(windows)} held-out windows of 512 tokens; "
        f"calibration {samples} x {seq_len} demo tokens; "
        f"healing: {args.heal_epochs} epochs of `transmla_heal` defaults over the same calibration set"
    )
    date = datetime.date.today().isoformat()
    results = {
        "command": command,
        "setting": setting,
        "machine": f"{platform.system()} {platform.machine()}, torch {torch.__version__}",
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    (out / f"transmla-{date}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# TransMLA on the demo model, {date}",
        "",
        f"Measured by `{command}` ({results['machine']}): {setting}.",
        "",
        "KV bytes per token: all layers, 2 bytes a number; GQA caches 2 x kv_heads x head_dim per layer, "
        "MLA kv_lora_rank + qk_rope_head_dim (counted from each exported config.json).",
        "",
        "| entry | KV cache | KV bytes/token | kv_lora_rank + rope | perplexity | gap to fp | mean KL (nats) | "
        "time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sizes = f"{r['kv_lora_rank']} + {r['qk_rope_head_dim']}" if r["kv_lora_rank"] else "-"
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(
            f"| {r['entry']} | {r['kv_cache_ratio']:.3f} | {r['kv_bytes_per_token']} | {sizes} | "
            f"{r['perplexity']:.3f} | {r['gap']:+.3f} | {r['kl']:.4f} | {seconds} |"
        )
    (out / f"transmla-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
