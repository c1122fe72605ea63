"""Regenerate what the documentation generates from the code and the recorded results: the recipe
reference in docs/RECIPES.md (from the step registry), the quality table in docs/QUALITY.md (from the
newest ``benchmarks/results/quality-*.json``), the step x family support matrix in docs/ARCHITECTURES.md and
README.md (from the steps' declared ``families`` and ``compressor.arch.ADAPTERS``), and the shipped recipe catalogue
``compressor/recipe_catalog.json`` that ``compressor methods`` and the command line's first recipe check
read without importing torch.

    python scripts/update_docs.py          # rewrite the generated sections and the catalogue in place
    python scripts/update_docs.py --check  # exit 1 if any of them is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# render this checkout's compressor, not a copy installed from elsewhere (run as a script, only
# scripts/ is on the path)
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def replace_section(path: Path, text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``<!-- name -->`` and ``<!-- /name -->`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{path.relative_to(ROOT)} has no <!-- {name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def recipe_reference(page: Path) -> str:
    from compressor.docs import recipe_reference
    from compressor.recipe import catalogue

    return recipe_reference(catalogue())


def support_matrix(page: Path) -> str:
    from compressor.docs import support_matrix
    from compressor.recipe import catalogue

    return support_matrix(catalogue())


def quality_table(page: Path) -> str:
    """The newest quality benchmark, rendered by the table functions the benchmark itself uses; the plot,
    when there is one, linked relative to ``page``."""
    results = sorted(RESULTS.glob("quality-*.json"))
    if not results:
        return "_No quality benchmark has been recorded yet: run `python benchmarks/quality.py`._\n"
    from compressor.docs import describe, markdown_table

    latest = json.loads(results[-1].read_text())
    plot = results[-1].with_suffix(".png")
    link = os.path.relpath(plot, page.parent)
    image = f"\n![perplexity against bits per weight]({link})\n" if plot.is_file() else ""
    return f"{describe(latest)}\n\n{markdown_table(latest)}{image}"


# file -> the generated sections it holds, each with its renderer
SECTIONS = {
    ROOT / "docs" / "RECIPES.md": {"recipe-reference": recipe_reference},
    ROOT / "docs" / "QUALITY.md": {"quality-table": quality_table},
    ROOT / "docs" / "ARCHITECTURES.md": {"support-matrix": support_matrix},
    ROOT / "README.md": {"support-matrix": support_matrix},
}


def render(path: Path) -> str:
    text = path.read_text()
    for name, body in SECTIONS[path].items():
        text = replace_section(path, text, name, body(path))
    return text


def render_catalogue() -> str:
    from compressor.recipe import catalogue

    return json.dumps(catalogue(), indent=1) + "\n"


def main() -> None:
    from compressor.recipe import CATALOGUE_FILE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale; write nothing")
    args = parser.parse_args()
    files = {path: render(path) for path in SECTIONS}
    files[CATALOGUE_FILE] = render_catalogue()
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/update_docs.py", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
