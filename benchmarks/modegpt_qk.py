"""MoDeGPT Type II (query-key) against plain truncated SVD, with the best pair choice there is.

    python benchmarks/modegpt_qk.py                  # the demo, every layer, 3/4 of the query-key parameters
    python benchmarks/modegpt_qk.py --model PATH --keep 0.75

Type II keeps whole rotary pairs per KV head and changes no kept weight: all it chooses is *which*
pairs. This script asks whether any choice could beat plain truncated SVD of ``q_proj`` and ``k_proj``
at the same parameter count. Per layer, on the attention inputs of 4 held-out windows (the statistics)
it takes three choices of the kept pairs: the CR scores (what the step uses), and the pairs that
minimise the exact error of the pre-softmax logits, found by trying every subset (per KV head, from
the Gram matrix of each pair's post-RoPE logit contribution, causal positions, summed over the group's
query heads); then it measures the relative error of the attention output (softmax, values, o_proj:
the module's output) on 2 other windows for both, and for the SVD of both weights at the rank whose
factors hold the same share of parameters (``svd.budget_rank``). Writes
``benchmarks/results/modegpt/qk-<date>.{json,md}``.

(Exhaustive search: C(d/2, kept) subsets per KV head; fine for the demo's 16 pairs, not for d = 128.)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from compressor.arch import attention_geometry  # noqa: E402
from compressor.eval import heldout_stream, load_causal_lm, make_windows  # noqa: E402
from compressor.lowrank.modegpt import BlockSizes, cr_key_query, key_query_keeping, write_attention  # noqa: E402
from compressor.lowrank.svd import budget_rank, truncated_svd  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "modegpt"


def attention_inputs(model, attention, tokens: torch.Tensor) -> dict:
    caught = {}
    hook = attention.register_forward_pre_hook(lambda m, a, kw: caught.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(tokens, use_cache=False)
    finally:
        hook.remove()
    return dict(caught)


def logit_optimal_pairs(attention, inputs: dict, geometry, keep: int) -> torch.Tensor:
    """Per KV head, the ``keep`` rotary pairs whose dropping changes the causal pre-softmax logits least
    (squared error summed over the group's query heads), by trying every subset."""
    heads, kv_heads, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    x = inputs["hidden_states"]
    cos, sin = inputs["position_embeddings"]
    batch, length, _ = x.shape
    q = attention.q_proj(x).view(batch, length, heads, d).transpose(1, 2)
    k = attention.k_proj(x).view(batch, length, kv_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    half = d // 2
    chosen = []
    for kv in range(kv_heads):
        gram = torch.zeros(half, half, dtype=torch.float64)
        for head in range(kv * heads // kv_heads, (kv + 1) * heads // kv_heads):
            contributions = torch.stack(
                [
                    (q[:, head][..., [p, p + half]] @ k[:, kv][..., [p, p + half]].transpose(-1, -2))[:, causal]
                    .reshape(-1)
                    .double()
                    for p in range(half)
                ]
            )
            gram += contributions @ contributions.T
        dropped = min(
            itertools.combinations(range(half), half - keep),
            key=lambda drop: float(gram[list(drop)][:, list(drop)].sum()),
        )
        chosen.append(sorted(set(range(half)) - set(dropped)))
    return torch.tensor(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--keep", type=float, default=0.75, help="share of the query-key parameters kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model)
    if model.config.attention_bias:
        raise SystemExit("this script compares bias-free query-key projections")
    geometry = attention_geometry(model.config)
    d = geometry.head_dim
    keep = round(d // 2 * args.keep)
    windows = make_windows(heldout_stream(tokenizer), 512, 6)
    rows = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        statistics, held_out = (
            attention_inputs(model, attention, windows[:4]),
            attention_inputs(model, attention, windows[4:]),
        )

        def error(module) -> float:
            with torch.no_grad():
                reference, output = attention(**held_out)[0], module(**held_out)[0]
            return float((output - reference).norm() / reference.norm())

        with torch.no_grad():
            x = statistics["hidden_states"]
            query_diag = attention.q_proj(x).pow(2).reshape(-1, geometry.num_heads, d).sum(0).double()
            key_diag = attention.k_proj(x).pow(2).reshape(-1, geometry.num_kv_heads, d).sum(0).double()
            cr = cr_key_query(attention.q_proj.weight, attention.k_proj.weight, query_diag, key_diag, keep)
            best = key_query_keeping(
                attention.q_proj.weight,
                attention.k_proj.weight,
                logit_optimal_pairs(attention, statistics, geometry, keep),
                geometry.num_heads,
            )
            whole_vo = (attention.v_proj.weight, attention.o_proj.weight, None)
            sizes = BlockSizes(0, keep, d)
            svd = copy.deepcopy(attention)
            for name in ("q_proj", "k_proj"):
                linear = getattr(svd, name)
                linear.weight.copy_(truncated_svd(linear.weight, budget_rank(*linear.weight.shape, 1 - args.keep))[0])
            row = {
                "layer": index,
                "cr": error(write_attention(attention, sizes, cr, whole_vo, geometry, sliced=True)),
                "logit_optimal": error(write_attention(attention, sizes, best, whole_vo, geometry, sliced=True)),
                "svd": error(svd),
                "cr_pairs": cr[4].tolist(),
                "logit_optimal_pairs": best[4].tolist(),
            }
        rows.append(row)
        print(
            f"layer {index}: CR {row['cr']:.4f}, logit-optimal pairs {row['logit_optimal']:.4f}, "
            f"plain SVD {row['svd']:.4f}",
            flush=True,
        )

    date = datetime.date.today().isoformat()
    command = (
        "python benchmarks/modegpt_qk.py"
        + (f" --model {args.model}" if args.model != "demo" else "")
        + (f" --keep {args.keep}" if args.keep != 0.75 else "")
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"qk-{date}.json").write_text(
        json.dumps(
            {
                "date": date,
                "command": command,
                "model": args.model,
                "keep": args.keep,
                "kept_pairs": keep,
                "rows": rows,
            },
            indent=1,
        )
    )
    lines = [
        f"# MoDeGPT query-key: CR pairs, the best pairs, plain SVD ({date})",
        "",
        f"Measured by `{command}` on `{args.model}`: {keep} of {d // 2} rotary pairs per KV head kept "
        f"({args.keep:.0%} of the query-key parameters), against `q_proj`/`k_proj` truncated SVD at the same "
        "parameter count. Relative error of the attention output on 2 held-out windows; statistics and the "
        "logit-optimal search on 4 others.",
        "",
        "| layer | CR pairs (the step) | logit-optimal pairs (exhaustive) | plain SVD |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['layer']} | {r['cr']:.4f} | {r['logit_optimal']:.4f} | {r['svd']:.4f} |" for r in rows]
    (OUT / f"qk-{date}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / f'qk-{date}.md'}")


if __name__ == "__main__":
    main()
