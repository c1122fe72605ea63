"""Regenerate what is generated from the code: the README's recipe reference (from the step
registry), its methods table (from the newest ``benchmarks/results/quality-*.json``), and the shipped
recipe catalogue ``compressor/recipe_catalog.json`` that ``compressor methods`` and the command line's
first recipe check read without importing torch.

    python scripts/update_readme.py          # rewrite README.md and the catalogue in place
    python scripts/update_readme.py --check  # exit 1 if either is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import json
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
    """The newest quality benchmark, rendered by the table functions the benchmark itself uses."""
    results = sorted((ROOT / "benchmarks" / "results").glob("quality-*.json"))
    if not results:
        return "_No quality benchmark has been recorded yet: run `python benchmarks/quality.py`._\n"
    from compressor.docs import describe, markdown_table

    latest = json.loads(results[-1].read_text())
    plot = results[-1].with_suffix(".png")
    link = f"\n![perplexity against bits per weight]({plot.relative_to(ROOT)})\n" if plot.is_file() else ""
    return f"{describe(latest)}\n\n{markdown_table(latest)}{link}"


def render(text: str) -> str:
    from compressor.docs import recipe_reference
    from compressor.recipe import catalogue

    text = replace_section(text, "recipe-reference", recipe_reference(catalogue()))
    return replace_section(text, "methods-table", methods_table())


def render_catalogue() -> str:
    from compressor.recipe import catalogue

    return json.dumps(catalogue(), indent=1) + "\n"


def main() -> None:
    from compressor.recipe import CATALOGUE_FILE

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    files = {ROOT / "README.md": render((ROOT / "README.md").read_text()), CATALOGUE_FILE: render_catalogue()}
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/update_readme.py", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path in stale:
        path.write_text(files[path])


if __name__ == "__main__":
    main()
