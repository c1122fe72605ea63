"""BFP KV cache with and without K-sort: KL to the model with an unquantized cache, perplexity gap, K bytes per token.

    python benchmarks/bfp.py                       # the demo model, and a tiny Llama with planted outlier key channels
    python benchmarks/bfp.py --model PATH --max-windows 32

Every row applies the ``bfp`` step (K-sort ``act_rms+greedy``: ``act_rms`` then ``refine: greedy``) with
``compressor.apply`` and scores the export with ``compressor.eval.evaluate_paths`` (what ``compressor eval
OUT --base MODEL`` prints): the export's weights are the base's, so the KL is the KV cache's alone. The
planted-outlier model is a random tiny Llama (head_dim 32, 2 KV heads) whose W_k rows are scaled by
per-rotary-pair factors
exp(0.7 N(0, 1)), two pairs per head by 10 more, and W_q rows by the inverse factors: q·k, hence the
model's function, is unchanged (checked), but its keys have outlier channels as real LLMs' do.

The bound rows (``--bound``, on the first model): the same cache with every key value given its own
exponent (block 1, then blocks of 2 and 4, no permutation). A value's own exponent is never above its
block's and the finer power-of-two grid contains the coarser one, so no element is quantized worse at
block 1 than in any block of 32 under any channel order: the block-1 KL is (up to the KL's own
non-monotonicity) the floor that K-sort at n = 32 can approach and never pass.
Results: benchmarks/results/bfp/bfp-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache

from compressor.weights.values import bfp_decode, bfp_encode

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bfp"

SETTINGS = [  # (block_size, ksort, scope); ksort "act_rms+greedy": act_rms then refine: greedy
    (32, "act_rms", "token"),
    (32, "act_rms+greedy", "token"),
    (32, "weight_norm", "token"),
    (32, "none", "token"),
    (128, "act_rms", "token"),
    (128, "none", "token"),
    (16, "act_rms", "head"),
    (16, "none", "head"),
]


def planted_outlier_model(folder: Path, seed: int) -> Path:
    """A random tiny Llama with outlier key channels and the same function as without them."""
    from transformers import AutoModelForCausalLM

    from compressor.testing import make_random_model

    source = make_random_model(
        "llama", folder / "source", seed=seed, hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 4, 2, 32
    probe = torch.randint(0, 320, (1, 48), generator=generator)
    before = model(probe).logits
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            pair_scale = torch.exp(0.7 * torch.randn(kv_heads, head_dim // 2, generator=generator))
            for h in range(kv_heads):
                pair_scale[h, torch.randperm(head_dim // 2, generator=generator)[:2]] *= 10
            scale = torch.cat([pair_scale, pair_scale], dim=1)  # channel j and j + D/2 rotate together: same factor
            attention.k_proj.weight.mul_(scale.reshape(-1, 1))
            q_scale = scale.repeat_interleave(heads // kv_heads, dim=0)  # query head j reads KV head j // group
            attention.q_proj.weight.div_(q_scale.reshape(-1, 1))
    after = model(probe).logits
    assert (after - before).abs().max() < 1e-3 * before.abs().max(), "the rescaling must not change the model"
    out = folder / "planted"
    model.save_pretrained(out)
    for file in source.glob("tokenizer*"):
        (out / file.name).write_bytes(file.read_bytes())
    return out


def measure(
    model: str, settings, work: Path, max_windows: int | None, seq_len: int, text: str, samples: int
) -> list[dict]:
    from compressor import Recipe, apply
    from compressor.eval import evaluate_paths

    rows = []
    for block_size, ksort, scope in settings:
        order, _, refine = ksort.partition("+")
        recipe = Recipe.from_dict(
            {
                "calibration": {"dataset": text, "samples": samples, "seq_len": seq_len},
                "steps": [
                    {
                        "bfp": {
                            "k_bits": 4,
                            "block_size": block_size,
                            "ksort": order,
                            "scope": scope,
                            "refine": refine or "none",
                        }
                    }
                ],
            }
        )
        out = work / f"kv4-n{block_size}-{ksort}-{scope}"
        apply(recipe, model, out, progress=False)
        result = evaluate_paths(str(out), model, text=text, seq_len=seq_len, max_windows=max_windows)
        kv = result.kv_cache
        rows.append(
            {
                "model": model,
                "k_bits": 4,
                "block_size": block_size,
                "ksort": ksort,
                "scope": scope,
                "kl": result.kl_divergence,
                "gap": result.perplexity_gap,
                "perplexity": result.perplexity,
                "base_perplexity": result.base_perplexity,
                "windows": result.windows,
                "tokens": result.tokens,
                "k_bytes_per_token": kv["k_bytes_per_token"],
                "dense_bytes_per_token": kv["dense_bytes_per_token"],
                "k_ratio": kv["k_ratio"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


class SmallBlockKeyCache(DynamicCache):
    """A ``DynamicCache`` whose keys go through BFP at blocks smaller than the format allows (the bound
    rows only): each token's flattened keys encoded and decoded with ``bfp_encode``/``bfp_decode``."""

    def __init__(self, config, bits: int, block_size: int):
        super().__init__(config=config)
        self.bits, self.block_size = bits, block_size

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, t, d = key_states.shape
        flat = key_states.transpose(1, 2).reshape(b, t, h * d)
        encoded = bfp_encode(flat, self.bits, self.block_size)
        decoded = bfp_decode(*encoded, self.bits, self.block_size).to(key_states.dtype)
        return super().update(decoded.reshape(b, t, h, d).transpose(1, 2), value_states, layer_idx, *args, **kwargs)


def measure_bound(model: str, block_sizes, max_windows: int | None, seq_len: int, text: str) -> list[dict]:
    """KL with keys quantized at 4-bit mantissas in blocks of ``block_sizes`` (1, 2, 4), no permutation."""
    from compressor.arch import attention_geometry
    from compressor.eval import evaluate, heldout_stream, load_causal_lm, make_windows
    from compressor.kvcache.bfp import stored_bytes

    base, tokenizer = load_causal_lm(model)
    quantized, _ = load_causal_lm(model)
    windows = make_windows(heldout_stream(tokenizer, text), seq_len, max_windows)
    rows = []
    for block_size in block_sizes:

        def start_cache(module, args, kwargs, block_size=block_size):
            kwargs["cache"] = SmallBlockKeyCache(module.config, 4, block_size)
            kwargs["use_cache"] = True
            return args, kwargs

        hook = quantized.register_forward_pre_hook(start_cache, with_kwargs=True)
        try:
            result = evaluate(quantized, windows, base)
        finally:
            hook.remove()
        geometry = attention_geometry(quantized.config)
        channels = geometry.num_kv_heads * geometry.head_dim
        k_bytes = stored_bytes(channels, 4, block_size)  # one token, one layer
        rows.append(
            {
                "model": model,
                "k_bits": 4,
                "block_size": block_size,
                "ksort": "none (bound)",
                "scope": "token",
                "kl": result.kl_divergence,
                "gap": result.perplexity - result.base_perplexity,
                "perplexity": result.perplexity,
                "base_perplexity": result.base_perplexity,
                "windows": result.windows,
                "tokens": result.tokens,
                "k_bytes_per_token": k_bytes * quantized.config.num_hidden_layers,
                "dense_bytes_per_token": 2 * channels * quantized.config.num_hidden_layers,
                "k_ratio": k_bytes / (2 * channels),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | K mantissa bits | block | K-sort | scope | K bytes/token (bf16) | ratio | perplexity (base) | gap | "
        "mean KL (nats) | KL / KL without K-sort |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        unsorted = next(
            (
                r
                for r in rows
                if r["model"] == row["model"]
                and r["scope"] == row["scope"]
                and r["ksort"] == "none"
                and (
                    r["block_size"] == row["block_size"] or (row["ksort"].endswith("(bound)") and r["block_size"] == 32)
                )
            ),
            None,
        )
        relative = f"{row['kl'] / unsorted['kl']:.3f}" if unsorted and unsorted["kl"] > 0 else "-"
        lines.append(
            f"| {row['model']} | {row['k_bits']} | {row['block_size']} | {row['ksort']} | {row['scope']} | "
            f"{row['k_bytes_per_token']} ({row['dense_bytes_per_token']}) | {row['k_ratio']:.3f} | "
            f"{row['perplexity']:.3f} ({row['base_perplexity']:.3f}) | {row['gap']:+.4f} | {row['kl']:.3g} | "
            f"{relative} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", help="default: demo and the planted-outlier tiny Llama (seeds 0, 1, 2)"
    )
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences (act_rms)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--bound",
        action="store_true",
        help="also the per-value-exponent rows (blocks 1, 2, 4) on the first model: "
        "the floor any channel order at n = 32 stays above",
    )
    parser.add_argument("--no-planted", action="store_true", help="skip the planted-outlier tiny Llamas")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = args.model or ["demo"]
        for model in models:
            rows += measure(model, SETTINGS, work / "demo", args.max_windows, args.seq_len, "demo", args.samples)
        if args.bound:
            rows += measure_bound(models[0], (1, 2, 4), args.max_windows, args.seq_len, "demo")
        if not args.model and not args.no_planted:
            for seed in (0, 1, 2):
                planted = planted_outlier_model(work / f"planted{seed}", seed)
                planted_rows = measure(
                    str(planted),
                    [
                        (32, "act_rms", "token"),
                        (32, "weight_norm", "token"),
                        (32, "none", "token"),
                        (16, "act_rms", "head"),
                        (16, "none", "head"),
                    ],
                    work / f"p{seed}",
                    16,
                    128,
                    "demo",
                    16,
                )
                for row in planted_rows:
                    row["model"] = f"planted-outliers seed {seed}"
                rows += planted_rows
    date = datetime.date.today().isoformat()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]
    )
    (args.output_dir / f"bfp-{date}.json").write_text(
        json.dumps({"command": command, "date": date, "rows": rows}, indent=1)
    )
    (args.output_dir / f"bfp-{date}.md").write_text(
        f"# BFP KV cache with and without K-sort ({date})\n\n"
        f"Measured by `{command}`. Demo: {args.max_windows} held-out "
        f"windows of {args.seq_len} tokens, calibration {args.samples} x {args.seq_len}; "
        "planted-outlier tiny Llamas: 16 windows of 128 tokens, calibration 16 x 128. "
        "KL: mean per-token KL to the same weights with an unquantized cache; values unquantized.\n\n"
        f"{markdown(rows)}\n"
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
