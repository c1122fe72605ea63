"""Regenerate the README's generated sections: the recipe reference (from the step registry) and the
methods table (from the newest ``benchmarks/results/quality-*.json``).

    python scripts/update_readme.py          # rewrite README.md in place
    python scripts/update_readme.py --check  # exit 1 if README.md is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def methods_table() -> str:
    import json

    results = sorted((ROOT / "benchmarks" / "results").glob("quality-*.json"))
    if not results:
        return "_No quality benchmark has been recorded yet: run `python benchmarks/quality.py`._\n"
    latest = json.loads(results[-1].read_text())
    lines = [
        f"Measured by `{latest['command']}` on {latest['date']} ({latest['machine']}), model `{latest['model']}`, "
        f"{latest['eval']['windows']} held-out windows of {latest['eval']['seq_len']} tokens.",
        "",
        "| method | recipe | bits/weight | perplexity | gap to fp | mean KL (nats) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in latest["rows"]:
        if row.get("error"):
            lines.append(f"| {row['method']} | {row.get('recipe') or '-'} | - | - | - | - | not run: {row['error']} |")
            continue
        kl = "-" if row.get("kl") is None else f"{row['kl']:.4f}"
        gap = "-" if row.get("gap") is None else f"{row['gap']:+.3f}"
        bits = "-" if row.get("bits_per_weight") is None else f"{row['bits_per_weight']:.3f}"
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.1f}"
        lines.append(f"| {row['method']} | {row.get('recipe') or '-'} | {bits} | {row['perplexity']:.3f} | {gap} | {kl} | {seconds} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    from compressor.docs import recipe_reference

    text = replace_section(text, "recipe-reference", recipe_reference())
    return replace_section(text, "methods-table", methods_table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    current = readme.read_text()
    updated = render(current)
    if args.check:
        sys.exit(0 if updated == current else 1)
    readme.write_text(updated)


if __name__ == "__main__":
    main()
