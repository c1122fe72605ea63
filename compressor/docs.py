"""What the documentation generates: the recipe reference, from a catalogue of the recipe keys
(``compressor methods``, docs/RECIPES.md), and the quality table, from a quality benchmark record
(``benchmarks/quality.py``'s output, docs/QUALITY.md); ``scripts/update_docs.py`` writes both.

The reference takes the catalogue as data (``recipe.catalogue()`` live, or ``recipe.shipped_catalogue()``),
so ``compressor methods`` answers without importing the method modules. The quality table takes the
record's JSON as data, so the docs are regenerated without importing the benchmark (nor torch)."""

from __future__ import annotations

from compressor.step import reference_rows

SECTION_SUMMARIES = {
    "calibration": "where calibration text comes from and how much of it",
    "export": "how the checkpoint is written",
}


def steps_overview(catalogue: dict) -> str:
    """Plain text: every step with its kind and summary, then its keys; then the sections."""
    blocks = [
        (
            f"{name} ({step['kind']} step{'' if step['needs_calibration'] else ', data-free'}): {step['summary']}",
            reference_rows(step["params"]),
        )
        for name, step in catalogue["steps"].items()
    ]
    blocks += [
        (f"[{name}]: {SECTION_SUMMARIES[name]}", reference_rows(specs)) for name, specs in catalogue["sections"].items()
    ]
    matrix = f"\nwhich step runs on which family (docs/ARCHITECTURES.md):\n{support_matrix(catalogue)}"
    key_width = max(len(key) for _, rows in blocks for key, _, _ in rows)
    default_width = max(len(default) for _, rows in blocks for _, default, _ in rows)
    lines = []
    for title, rows in blocks:
        lines.append(title)
        lines.extend(
            f"    {key:<{key_width}}  {default:<{default_width}}  {help_text}" for key, default, help_text in rows
        )
    return "\n".join(lines) + matrix


def support_matrix(catalogue: dict) -> str:
    """Markdown: which step runs on which family (hand-written adapters, then any family the generic adapter
    accepts). A step declares the families whose block it assumes (``Step.families``); steps writing our
    native format need the family's native model type."""
    families = catalogue["families"]
    lines = [
        "| step | " + " | ".join(f["family"] for f in families) + " | generic |",
        "|---|" + "---|" * (len(families) + 1),
    ]
    for name, step in catalogue["steps"].items():

        def cell(family: dict | None) -> str:
            if step["families"] is not None:
                return "yes" if family is not None and family["family"] in step["families"] else "-"
            if step["native_format"] and (family is None or not family["native_format"]):
                return "dense export only"
            return "yes"

        lines.append(f"| `{name}` | " + " | ".join(cell(f) for f in families) + f" | {cell(None)} |")
    return "\n".join(lines) + "\n"


def _table(specs: list[dict]) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [
        f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |"
        for key, default, help_text in reference_rows(specs)
    ]
    return rows


def recipe_reference(catalogue: dict) -> str:
    """Markdown: one table per section and per step."""
    lines = []
    for name, specs in catalogue["sections"].items():
        lines += [f"#### `{name}`: {SECTION_SUMMARIES[name]}", "", *_table(specs), ""]
    for name, step in catalogue["steps"].items():
        data = "" if step["needs_calibration"] else ", data-free"
        lines += [
            f"#### step `{name}` ({step['kind']} step{data})",
            "",
            step["summary"],
            "",
            *_table(step["params"]),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# The quality benchmark's table (benchmarks/quality.py prints and writes it; docs/QUALITY.md holds the newest)

QUALITY_COLUMNS = [
    "method",
    "recipe",
    "bits/weight",
    "size (MiB)",
    "perplexity",
    "gap to fp",
    "mean KL (nats)",
    "time (s)",
    "peak mem (GiB)",
    "notes",
]


def sort_key(row: dict):
    return (row.get("bits_per_weight") is None, row.get("bits_per_weight") or 0, row["method"], row["recipe"])


def markdown_table(record: dict) -> str:
    """The results table, sorted by bits per weight (rows that did not run last, with the reason)."""
    several = len({row["model"] for row in record["rows"]}) > 1
    columns = (["model"] if several else []) + QUALITY_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    def measured(row):
        return [f"measured {row['measured']}"] if record.get("history") else []

    for row in sorted(record["rows"], key=sort_key):
        if row.get("error"):
            cells = [row["method"], row["recipe"]] + ["-"] * 7 + [row["error"].replace("|", "/")]
        else:
            cells = [
                row["method"],
                row["recipe"],
                number(row["bits_per_weight"], ".3f"),
                number(row["size_bytes"] / 2**20, ".2f"),
                number(row["perplexity"], ".3f"),
                number(row["gap"], "+.3f"),
                number(row["kl"], ".2g"),  # two significant digits: the small KLs (mixed precision) stay visible
                number(row.get("seconds"), ".1f"),
                number(row.get("peak_memory_gib"), ".2f"),
                "; ".join([*(row.get("notes") or []), *measured(row)]),
            ]
        lines.append("| " + " | ".join(([row["model"]] if several else []) + cells) + " |")
    return "\n".join(lines) + "\n"


def describe(record: dict) -> str:
    """One paragraph: the commands, dates and machines that measured ``record``, what was scored and how."""
    evaluation, calibration = record["eval"], record["calibration"]
    windows = evaluation["windows"]
    windows = ", ".join(str(w) for w in windows) if isinstance(windows, list) else windows
    samples = (
        f"{calibration['samples']} samples for every method, whatever its recipe says"
        if calibration["samples"]
        else "each recipe’s number of samples"
    )
    history = record.get("history") or []
    if len(history) > 1:
        runs = "; then ".join(f"`{h['command']}` on {h['date']} ({h['machine']})" for h in history)
        return (
            f"Measured by {runs} (each row says when it was measured), model `{record['model']}`: {windows} held-out "
            f"windows of {evaluation['seq_len']} tokens from `{evaluation['text']}`; calibration: "
            f"{calibration['text'] or 'each recipe’s text (GPTQ: demo)'}, {samples}."
        )
    return (
        f"Measured by `{record['command']}` on {record['date']} ({record['machine']}), model `{record['model']}`: "
        f"{windows} held-out windows of {evaluation['seq_len']} tokens from `{evaluation['text']}` (`compressor eval` "
        "scores every window of the text by default, 120 on the demo, so its perplexities differ from this table's); "
        f"calibration: {calibration['text'] or 'each recipe’s text (GPTQ: demo)'}, {samples}."
    )
