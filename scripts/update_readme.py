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
    """The newest quality benchmark, rendered by the benchmark's own table function."""
    import json

    results = sorted((ROOT / "benchmarks" / "results").glob("quality-*.json"))
    if not results:
        return "_No quality benchmark has been recorded yet: run `python benchmarks/quality.py`._\n"
    from benchmarks.quality import describe, markdown_table

    latest = json.loads(results[-1].read_text())
    plot = results[-1].with_suffix(".png")
    link = f"\n![perplexity against bits per weight]({plot.relative_to(ROOT)})\n" if plot.is_file() else ""
    return f"{describe(latest)}\n\n{markdown_table(latest)}{link}"


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
