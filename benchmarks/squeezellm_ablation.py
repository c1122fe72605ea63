"""SqueezeLLM ablation on the demo model: weighting, the unbiased rescale, k-means seeds, and what the
perplexity gap measures there.

    python benchmarks/squeezellm_ablation.py            # 100 x 512 calibration tokens, 32 windows, 3 seeds
    python benchmarks/squeezellm_ablation.py --quick    # 32 x 512, 8 windows, 1 seed

Every row quantizes the seven projections of every block of the same in-memory fp32 model (weights
replaced by their dequantized values; the export round trip is covered by the tests and by
``quality.py``) and scores it on the same held-out windows: perplexity gap to fp and mean per-token
KL from fp. The Fisher comes from ``compressor.quant.squeezellm.fisher_diagonal`` once, on the
calibration tokens a recipe would draw.

The perplexity gap is split into its first-order part, ``ppl_fp * <g, W_q - W>`` with ``g`` the
gradient of the mean held-out NLL at the fp weights, and the rest. On a converged model ``g`` is
about 0 and the gap is second order (what the KL measures); the demo model is trained for minutes,
so ``g`` is not 0, and this column shows how much of each gap is a projection of the weight error
onto that gradient: a number of either sign that does not rank quantizers.
Writes ``benchmarks/results/squeezellm/ablation-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from compressor.calibration import calibration_tokens  # noqa: E402
from compressor.eval import evaluate, heldout_stream, load_causal_lm, make_windows  # noqa: E402
from compressor.quant.squeezellm import fisher_diagonal, quantize_squeezellm  # noqa: E402
from compressor.quant.uniform import quantize_uniform  # noqa: E402
from compressor.recipe import CalibrationConfig  # noqa: E402
from compressor.testing import WholeModelContext  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def heldout_gradient(model, weights: dict[str, torch.Tensor], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the mean next-token NLL over ``windows`` for each weight."""
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for batch in windows.split(4):
            (model(input_ids=batch, labels=batch).loss * len(batch) / len(windows)).backward()
        return {name: weight.grad.clone() for name, weight in weights.items()}
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
            weight.grad = None


def variants(bits: int, seeds: int):
    """(label, group, function(weight, fisher) -> dequantized weight)."""

    def rtn(group_size):
        return lambda w, f: quantize_uniform(
            w, bits, group_size, symmetric=False, scale_dtype=torch.float16
        ).dequantize(torch.float32)

    def squeeze(weighting, rescale, seed):
        def run(w, f):
            weights = f if weighting == "fisher" else torch.ones_like(w)
            return quantize_squeezellm(w, weights, bits, init="kmeans++", seed=seed, rescale=rescale).dequantize(
                torch.float32
            )

        return run

    yield f"RTN w{bits} g128", "rtn g128", rtn(128)
    yield f"RTN w{bits} per row", "rtn per row", rtn(-1)
    for weighting in ("fisher", "unweighted"):
        for rescale in ("none", "unbiased"):
            for seed in range(seeds):
                group = f"k-means {weighting}, rescale {rescale}"
                yield f"{group}, seed {seed}", group, squeeze(weighting, rescale, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()
    samples, windows_count, seeds = (32, 8, 1) if args.quick else (100, 32, 3)
    torch.manual_seed(0)

    base, tokenizer = load_causal_lm(args.model)
    model, _ = load_causal_lm(args.model)
    model.requires_grad_(False)
    modules = {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS}
    original = {name: module.weight.data.clone() for name, module in modules.items()}
    windows = make_windows(heldout_stream(tokenizer), 512, windows_count)
    tokens = calibration_tokens(tokenizer, CalibrationConfig(dataset="demo", samples=samples, seq_len=512, seed=0))

    started = time.perf_counter()
    fisher = fisher_diagonal(WholeModelContext(model), modules, tokens, torch.device("cpu"))
    print(f"Fisher: {samples} x 512 tokens, {time.perf_counter() - started:.0f} s", flush=True)
    gradient = heldout_gradient(model, {name: m.weight for name, m in modules.items()}, windows)

    rows = []
    for bits in args.bits:
        for label, group, quantize in variants(bits, seeds):
            started = time.perf_counter()
            first_order = 0.0
            for name, module in modules.items():
                module.weight.data = quantize(original[name], fisher[name]).to(original[name].dtype)
                first_order += float((gradient[name].double() * (module.weight.data - original[name]).double()).sum())
            result = evaluate(model, windows, base)
            for name, module in modules.items():
                module.weight.data = original[name]
            row = {
                "bits": bits,
                "entry": label,
                "group": group,
                "gap": result.perplexity_gap,
                "kl": result.kl_divergence,
                "first_order_gap": result.base_perplexity * first_order,
                "seconds": time.perf_counter() - started,
            }
            row["rest_of_gap"] = row["gap"] - row["first_order_gap"]
            rows.append(row)
            print(
                f"{label}: gap {row['gap']:+.3f} (first order {row['first_order_gap']:+.3f}, "
                f"rest {row['rest_of_gap']:+.3f}), KL {row['kl']:.5f}",
                flush=True,
            )
    write(rows, args, samples, len(windows), base_perplexity=result.base_perplexity)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (min..max) over seeds of each group."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["bits"], row["group"]), []).append(row)
    summary = []
    for (bits, group), members in groups.items():
        entry = {"bits": bits, "group": group, "runs": len(members)}
        for key in ("gap", "first_order_gap", "rest_of_gap", "kl"):
            values = [m[key] for m in members]
            entry[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
        summary.append(entry)
    return summary


def write(rows: list[dict], args, samples: int, windows: int, base_perplexity: float) -> None:
    command = "python benchmarks/squeezellm_ablation.py" + (" --quick" if args.quick else "")
    if args.bits != [3, 4]:
        command += " --bits " + " ".join(map(str, args.bits))
    date = datetime.date.today().isoformat()
    machine = f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    setting = (
        f"model `{args.model}` (fp perplexity {base_perplexity:.3f}), fp32 compute, "
        f"{windows} held-out windows of 512 tokens, "
        f"Fisher from {samples} demo calibration sequences of 512 tokens; k-means `init: kmeans++` (the official start)"
    )
    summary = summarize(rows)
    out = ROOT / "benchmarks" / "results" / "squeezellm"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation-{date}.json").write_text(
        json.dumps(
            {"command": command, "machine": machine, "setting": setting, "rows": rows, "summary": summary}, indent=2
        )
    )

    def cell(stat, digits, sign=""):
        return (
            f"{stat['mean']:{sign}.{digits}f}"
            if stat["min"] == stat["max"]
            else f"{stat['mean']:{sign}.{digits}f} ({stat['min']:{sign}.{digits}f}..{stat['max']:{sign}.{digits}f})"
        )

    lines = [
        f"# SqueezeLLM ablation on the demo model, {date}",
        "",
        f"Measured by `{command}` on {date} ({machine}): {setting}.",
        "",
        "Mean over k-means seeds (min..max). *first order*: `ppl_fp * <g, W_q - W>`, "
        "`g` the gradient of the mean held-out NLL at the fp weights; "
        "*rest*: gap minus first order (second and higher order, what the KL tracks).",
        "",
        "| bits | quantizer | runs | mean KL (nats) | perplexity gap | first order | rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['bits']} | {s['group']} | {s['runs']} | {cell(s['kl'], 5)} | {cell(s['gap'], 3, '+')} | "
            f"{cell(s['first_order_gap'], 3, '+')} | {cell(s['rest_of_gap'], 3, '+')} |"
        )
    (out / f"ablation-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
