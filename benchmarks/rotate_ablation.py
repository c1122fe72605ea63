"""Which of rotate's parts pays at W4A4: rotate+RTN (recipes/rotate-rtn-w4a4.yaml) with the per-head V/O
rotation and the online Hadamard before down_proj each switched off, scored as benchmarks/quality.py
scores its rows (same windows, same eval), on any model:

    PYTHONPATH=. python benchmarks/rotate_ablation.py --quick [--model PATH --text FILE --calibration FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

import quality

from compressor.recipe import Recipe

VARIANTS = {
    "rtn (no rotation)": None,
    "rotate (all)": {},
    "rotate, heads: false": {"heads": False},
    "rotate, online_hadamard: false": {"online_hadamard": False},
    "rotate, neither": {"heads": False, "online_hadamard": False},
    # another draw of the residual stream's signs: how much of a difference is the draw's
    "rotate (all), seed: 1": {"seed": 1},
    "rotate, heads: false, seed: 1": {"heads": False, "seed": 1},
    # SpinQuant-style: R1 learned from the seed's Hadamard by Cayley SGD on the layer-wise W4A4 proxy loss
    "rotate (all), learned_steps: 100": {"learned_steps": 100},
    "rotate (all), learned_steps: 100, seed: 1": {"learned_steps": 100, "seed": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--text", default="demo")
    parser.add_argument("--calibration", help="calibration text of the learned rotation (default: the recipe's)")
    parser.add_argument("--quick", action="store_true", help="32 held-out windows")
    parser.add_argument("--output", type=Path, required=True, help="a .json file; the .md goes beside it")
    parser.add_argument("--only", action="append", help="run only the variants containing this text; repeatable")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from compressor.eval import heldout_stream, make_windows
    from compressor.model import resolve_model_path

    settings = quality.Settings(text=args.text, max_windows=32 if args.quick else None, calibration=args.calibration)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    windows = make_windows(heldout_stream(tokenizer, settings.text), settings.seq_len, settings.max_windows)
    base = Recipe.from_yaml(quality.ROOT / "recipes" / "rotate-rtn-w4a4.yaml")
    rows = []
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or any(text in k for text in args.only)}
    for name, keys in chosen.items():
        data = copy.deepcopy(base.to_dict())
        if keys is None:
            data["steps"] = data["steps"][1:]
        else:
            data["steps"][0]["rotate"].update(keys)
        recipe = Recipe.from_dict(data)
        entry = quality.Entry("compressor", name, quality.recipe_runner(recipe))
        with tempfile.TemporaryDirectory(prefix="ablation-") as work:
            rows.append(quality.run_entry(entry, args.model, windows, settings, Path(work)))
        print(name, rows[-1]["kl"], flush=True)
    record = {"date": datetime.date.today().isoformat(), "model": args.model, "text": args.text, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# rotate ablation at W4A4 (RTN), {record['date']}, model `{args.model}`, {len(windows)} windows", ""]
    lines += [f"Measured by `PYTHONPATH=. python {shlex.join(sys.argv)}` on {quality.machine_description()}.", ""]
    lines += ["| variant | perplexity | gap to fp | mean KL |", "|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['perplexity']:.3f} | {r['gap']:+.3f} | {r['kl']:.5f} |" for r in rows]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
