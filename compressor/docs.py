"""The recipe reference, generated from a catalogue of the recipe keys (``compressor methods``, README).

Both take the catalogue as data (``recipe.catalogue()`` live, or ``recipe.shipped_catalogue()``), so
``compressor methods`` answers without importing the method modules."""

from __future__ import annotations

from compressor.step import reference_rows

SECTION_SUMMARIES = {
    "calibration": "where calibration text comes from and how much of it",
    "export": "how the checkpoint is written",
}


def steps_overview(catalogue: dict) -> str:
    """Plain text: every step with its kind and summary, then its keys; then the sections."""
    blocks = [
        (f"{name} ({step['kind']} step{'' if step['needs_calibration'] else ', data-free'}): {step['summary']}", reference_rows(step["params"]))
        for name, step in catalogue["steps"].items()
    ]
    blocks += [(f"[{name}]: {SECTION_SUMMARIES[name]}", reference_rows(specs)) for name, specs in catalogue["sections"].items()]
    key_width = max(len(key) for _, rows in blocks for key, _, _ in rows)
    default_width = max(len(default) for _, rows in blocks for _, default, _ in rows)
    lines = []
    for title, rows in blocks:
        lines.append(title)
        lines.extend(f"    {key:<{key_width}}  {default:<{default_width}}  {help_text}" for key, default, help_text in rows)
    return "\n".join(lines)


def _table(specs: list[dict]) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |" for key, default, help_text in reference_rows(specs)]
    return rows


def recipe_reference(catalogue: dict) -> str:
    """Markdown: one table per section and per step."""
    lines = []
    for name, specs in catalogue["sections"].items():
        lines += [f"#### `{name}`: {SECTION_SUMMARIES[name]}", "", *_table(specs), ""]
    for name, step in catalogue["steps"].items():
        data = "" if step["needs_calibration"] else ", data-free"
        lines += [f"#### step `{name}` ({step['kind']} step{data})", "", step["summary"], "", *_table(step["params"]), ""]
    return "\n".join(lines).rstrip() + "\n"
