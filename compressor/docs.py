"""The recipe reference, generated from the step registry (``compressor methods``, README)."""

from __future__ import annotations

from compressor.methods import registered_steps
from compressor.recipe import CalibrationConfig, ExportConfig
from compressor.step import step_reference


def _sections():
    yield "calibration", "where calibration text comes from and how much of it", CalibrationConfig
    yield "export", "how the checkpoint is written", ExportConfig


def steps_overview() -> str:
    lines = []
    for name, cls in registered_steps().items():
        lines.append(f"{name} ({cls.kind} step{'' if cls.needs_calibration else ', data-free'}): {cls.summary()}")
        lines.extend(f"    {key:<14} {default:<12} {help_text}" for key, default, help_text in step_reference(cls))
    for name, summary, cls in _sections():
        lines.append(f"[{name}]: {summary}")
        lines.extend(f"    {key:<14} {default:<12} {help_text}" for key, default, help_text in step_reference(cls))
    return "\n".join(lines)


def _table(cls) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |" for key, default, help_text in step_reference(cls)]
    return rows


def recipe_reference() -> str:
    """Markdown: one table per section and per step."""
    lines = []
    for name, summary, cls in _sections():
        lines += [f"#### `{name}`: {summary}", "", *_table(cls), ""]
    for name, cls in registered_steps().items():
        data = "" if cls.needs_calibration else ", data-free"
        lines += [f"#### step `{name}` ({cls.kind} step{data})", "", cls.summary(), "", *_table(cls), ""]
    return "\n".join(lines).rstrip() + "\n"
