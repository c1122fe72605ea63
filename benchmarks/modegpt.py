"""MoDeGPT: what the sliced checkpoint saves on disk and in time, against the original, in one run.

    python benchmarks/modegpt.py                         # the demo model, ratio 0.25
    python benchmarks/modegpt.py --random-llama 1024,8   # a random-weight Llama, hidden 1024, 8 layers (speed only)

Applies ``recipes/modegpt-25.yaml``'s step (``modegpt``, ``export: sliced``) with the recipe's calibration
(or ``--samples``), loads the original and the sliced checkpoint the way ``compressor eval`` does (fp32 on
the CPU, the checkpoint dtype on a GPU), and measures, alternating the two models so that both see the
same machine state: safetensors bytes, parameters, prefill time of one ``--prompt``-token prompt (median
of ``--repeats``; no cache), and decode tokens/s (greedy generation of ``--decode`` tokens after a short
prompt, with the KV cache). With ``--quality`` (the demo) it also scores both on the held-out windows
(perplexity gap and mean KL), beside the plain-SVD baseline at the same parameter count (``svd``).
Writes ``benchmarks/results/modegpt/throughput-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from compressor import Recipe, apply  # noqa: E402
from compressor.eval import evaluate, heldout_stream, load_causal_lm, make_windows  # noqa: E402
from compressor.model import resolve_model_path  # noqa: E402
from compressor.testing import make_random_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "modegpt"


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def block_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)


@torch.no_grad()
def prefill_seconds(model, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    model(tokens, use_cache=False)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument(
        "--random-llama", help="HIDDEN,LAYERS: benchmark a random-weight Llama of that size instead (speed only)"
    )
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument(
        "--samples", type=int, default=128, help="calibration sequences of 512 tokens (the recipe's 128)"
    )
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--quality", action="store_true", help="also perplexity/KL of both and of the plain-SVD baseline"
    )
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="modegpt-bench-"))
    model = args.model
    if args.random_llama:
        hidden, layers = (int(v) for v in args.random_llama.split(","))
        model = str(
            make_random_model(
                "llama",
                work / "random",
                dtype=torch.bfloat16,
                hidden_size=hidden,
                intermediate_size=hidden * 11 // 4,
                num_hidden_layers=layers,
                num_attention_heads=hidden // 64,
                num_key_value_heads=max(1, hidden // 256),
                max_position_embeddings=2048,
            )
        )
    calibration = {"dataset": "demo", "samples": args.samples, "seq_len": 512, "seed": 0}
    started = time.perf_counter()
    report = apply(
        Recipe.from_dict(
            {"calibration": calibration, "steps": [{"modegpt": {"ratio": args.ratio, "export": "sliced"}}]}
        ),
        model,
        work / "sliced",
        device=args.device,
        progress=False,
    )
    compress_seconds = time.perf_counter() - started

    original, tokenizer = load_causal_lm(model, device=args.device)
    sliced, _ = load_causal_lm(str(work / "sliced"), device=args.device)
    vocab = original.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(args.device)
    short = prompt[:, :16]
    for m in (original, sliced):  # warm up
        prefill_seconds(m, prompt)
        decode_tokens_per_second(m, short, 4)
    times = {"original": [], "sliced": []}
    rates = {"original": [], "sliced": []}
    for _ in range(args.repeats):
        for name, m in (("original", original), ("sliced", sliced)):
            times[name].append(prefill_seconds(m, prompt))
            rates[name].append(decode_tokens_per_second(m, short, args.decode))
    rows = []
    for name, m, folder in (("original", original, resolve_model_path(model)), ("sliced", sliced, work / "sliced")):
        rows.append(
            {
                "model": name,
                "safetensors_bytes": safetensors_bytes(folder),
                "block_parameters": block_parameters(m),
                "prefill_seconds": statistics.median(times[name]),
                "prefill_tokens_per_second": args.prompt / statistics.median(times[name]),
                "decode_tokens_per_second": statistics.median(rates[name]),
            }
        )
    base, new = rows
    ratios = {
        "disk": new["safetensors_bytes"] / base["safetensors_bytes"],
        "block_parameters": new["block_parameters"] / base["block_parameters"],
        "prefill_speedup": base["prefill_seconds"] / new["prefill_seconds"],
        "decode_speedup": new["decode_tokens_per_second"] / base["decode_tokens_per_second"],
    }
    quality = []
    if args.quality:
        windows = make_windows(heldout_stream(tokenizer), 512, args.windows)
        apply(
            Recipe.from_dict({"calibration": calibration, "steps": [{"svd": {"ratio": args.ratio}}]}),
            model,
            work / "svd",
            progress=False,
        )
        for name, path in (("modegpt", work / "sliced"), ("svd", work / "svd")):
            result = evaluate(load_causal_lm(str(path), device=args.device)[0], windows, original)
            quality.append(
                {
                    "entry": name,
                    "perplexity": result.perplexity,
                    "base_perplexity": result.base_perplexity,
                    "gap": result.perplexity_gap,
                    "kl": result.kl_divergence,
                    "windows": result.windows,
                }
            )
    command = "python benchmarks/modegpt.py " + " ".join(sys.argv[1:])
    record = {
        "command": command.strip(),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        "model": args.random_llama and f"random Llama hidden,layers={args.random_llama}" or args.model,
        "ratio": args.ratio,
        "removed": [r for r in report.to_dict()["modules"] if r["module"].endswith(".blocks")][0]["removed"],
        "compress_seconds": compress_seconds,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "rows": rows,
        "ratios": ratios,
        "quality": quality,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = (
        OUT / f"throughput-{record['date']}"
        if not args.random_llama
        else OUT / f"throughput-{record['date']}-random-{args.random_llama.replace(',', 'x')}"
    )
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# MoDeGPT sliced vs original, {record['date']}",
        "",
        f"`{record['command']}` on {record['machine']}; model {record['model']}; ratio {args.ratio} "
        f"(removed {record['removed']:.3f} of the block weights); compression {compress_seconds:.0f} s.",
        "",
        "| model | safetensors MiB | block params | prefill ms ("
        + str(args.prompt)
        + " tokens) | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['safetensors_bytes'] / 2**20:.2f} | {r['block_parameters']:,} | "
            f"{1000 * r['prefill_seconds']:.1f} | "
            f"{r['prefill_tokens_per_second']:.0f} | {r['decode_tokens_per_second']:.1f} |"
        )
    lines += [
        "",
        f"Sliced / original: disk {ratios['disk']:.3f}x, block parameters {ratios['block_parameters']:.3f}x, "
        f"prefill {ratios['prefill_speedup']:.2f}x faster, decode {ratios['decode_speedup']:.2f}x faster.",
    ]
    if quality:
        lines += ["", "| entry | perplexity | gap | mean KL |", "|---|---|---|---|"]
        lines += [f"| {q['entry']} | {q['perplexity']:.3f} | {q['gap']:+.3f} | {q['kl']:.5f} |" for q in quality]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
