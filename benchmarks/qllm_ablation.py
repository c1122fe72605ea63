"""Which of QLLM's parts pays at W4A4 (and which merge score): variants of a QLLM recipe (default
recipes/qllm-w4a4.yaml; ``--recipe`` for another, e.g. rotate-qllm-w4a4.yaml) with keys of its qllm step
changed, scored as benchmarks/quality.py scores its rows (same windows, same eval), on any model:

    PYTHONPATH=. python -P benchmarks/qllm_ablation.py --quick --samples 32 --output FILE.json \\
        [--model PATH --text FILE --calibration FILE] [--only TEXT]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import shlex
import sys
import tempfile
from pathlib import Path

from compressor.recipe import Recipe

# quality.py beside this file, loaded without putting benchmarks/ on sys.path (run with python -P): its
# kernels.py would shadow the ``kernels`` package transformers imports
_spec = importlib.util.spec_from_file_location("quality", Path(__file__).with_name("quality.py"))
quality = sys.modules["quality"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

VARIANTS = {
    "rtn-w4a4.yaml (reference)": "rtn",
    # the merge criterion, with no error correction so that only the reassembly differs
    "merge_score: code, epochs: 0": {"merge_score": "code", "epochs": 0},
    "merge_score: paper, epochs: 0": {"merge_score": "paper", "epochs": 0},
    "group_blocks: 1": {"group_blocks": 1, "tune_final_norm": False},
    "group_blocks: 4": {"group_blocks": 4, "tune_final_norm": False},
    "group_blocks: 1, tune_final_norm": {"group_blocks": 1, "tune_final_norm": True},
    "group_blocks: 4, tune_final_norm": {"group_blocks": 4, "tune_final_norm": True},
    "group_blocks: 2, tune_final_norm": {"group_blocks": 2, "tune_final_norm": True},
    "group_blocks: 4, tune_final_norm, merge_score: paper": {
        "group_blocks": 4,
        "tune_final_norm": True,
        "merge_score": "paper",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--text", default="demo")
    parser.add_argument("--calibration", help="calibration text (default: the recipe's)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--recipe", default="qllm-w4a4.yaml", help="a file of recipes/ whose qllm step is varied")
    parser.add_argument("--quick", action="store_true", help="32 held-out windows")
    parser.add_argument("--output", type=Path, required=True, help="a .json file; the .md goes beside it")
    parser.add_argument("--only", action="append", help="run only the variants whose name is one of these; repeatable")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from compressor.eval import heldout_stream, make_windows
    from compressor.model import resolve_model_path

    settings = quality.Settings(
        text=args.text,
        max_windows=32 if args.quick else None,
        calibration=args.calibration,
        calibration_samples=args.samples,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    windows = make_windows(heldout_stream(tokenizer, settings.text), settings.seq_len, settings.max_windows)
    base = Recipe.from_yaml(quality.ROOT / "recipes" / args.recipe)
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    rows = json.loads(args.output.read_text())["rows"] if args.output.exists() else []  # resumes a record
    done = {row["recipe"] for row in rows}
    for name, keys in chosen.items():
        if name in done:
            continue
        if keys == "rtn":
            recipe = Recipe.from_yaml(quality.ROOT / "recipes" / "rtn-w4a4.yaml")
        else:
            data = copy.deepcopy(base.to_dict())
            next(step for step in data["steps"] if "qllm" in step)["qllm"].update(keys)
            recipe = Recipe.from_dict(data)
        entry = quality.Entry("compressor", name, quality.recipe_runner(recipe))
        with tempfile.TemporaryDirectory(prefix="ablation-") as work:
            rows.append(quality.run_entry(entry, args.model, windows, settings, Path(work)))
        print(name, rows[-1].get("kl"), flush=True)
        write(args, rows, len(windows))


def write(args, rows: list[dict], windows: int) -> None:
    record = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "text": args.text,
        "calibration": args.calibration,
        "samples": args.samples,
        "recipe": args.recipe,
        "command": f"PYTHONPATH=. python -P {shlex.join(sys.argv)}",
        "machine": quality.machine_description(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    reference = next((r["kl"] for r in rows if r["recipe"].startswith("rtn") and "kl" in r), None)
    lines = [f"# QLLM ablation at W4A4 ({args.recipe}), {record['date']}, model `{args.model}`", ""]
    lines += [
        f"Measured by `{record['command']}` on {record['machine']}: {windows} held-out windows of 512 tokens, "
        f"{args.samples} calibration samples of 512 tokens.",
        "",
        "| variant | perplexity | gap to fp | mean KL | / RTN W4A4 | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "kl" not in r:
            lines.append(f"| {r['recipe']} | {r.get('error')} | | | | |")
            continue
        ratio = f"{r['kl'] / reference:.2f}" if reference else "-"
        numbers = f"{r['perplexity']:.3f} | {r['gap']:+.3f} | {r['kl']:.5f} | {ratio} | {r['seconds']:.0f}"
        lines.append(f"| {r['recipe']} | {numbers} |")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
