"""Recipes: YAML <-> typed objects.

A recipe is three sections::

    calibration: {dataset: demo, samples: 128, seq_len: 512, seed: 0}
    steps:
      - rtn: {bits: 4, group_size: 128, symmetric: false, ignore: [lm_head]}
    export: {format: auto}

Every step is a dataclass registered with ``@register_step("name")`` (``compressor.step``); its
fields, declared with ``param(...)``, are the recipe keys, with their defaults, allowed values and
one line of help. The same declarations drive validation, ``compressor methods`` and the README's
recipe reference; the method modules are listed in ``compressor.methods``.

Validation is strict: unknown sections, steps and keys are errors (with a did-you-mean), and every
error is one line naming the file, the step and the key, e.g.
``recipes/x.yaml: steps[0].rtn.bits: 9 is not one of 2..8``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compressor.methods import registered_steps
from compressor.step import Config, RecipeError, Step, did_you_mean, build_config, param, register_step

__all__ = ["CalibrationConfig", "ExportConfig", "Recipe", "RecipeError", "Step", "param", "parse_step", "register_step"]


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class CalibrationConfig(Config):
    dataset: str = param("demo", "calibration text: 'demo', a local .txt/.jsonl/.parquet file or folder, or a datasets name")
    samples: int = param(128, "number of calibration sequences", min=1)
    seq_len: int = param(512, "tokens per calibration sequence", min=8)
    seed: int = param(0, "seed for choosing the sequences")
    split: str = param("train", "dataset split (datasets names only)")
    text_column: str = param("text", "column holding the text (jsonl, parquet and datasets names)")


@dataclass
class ExportConfig(Config):
    format: str = param("auto", "checkpoint format (auto: compressed-tensors for uniform weights, compressor for lookup tables)",
                        choices=("auto", "compressed-tensors", "compressor", "dense"))
    dtype: str = param("auto", "dtype of unquantized tensors and scales", choices=("auto", "float16", "bfloat16", "float32"))
    max_shard_size: str = param("5GB", "largest safetensors shard, e.g. 2GB or 500MB")

    def check(self) -> None:
        from compressor.export.shards import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError as error:
            raise ValueError(f"max_shard_size: {error}") from None


SECTIONS = ("calibration", "steps", "export")


@dataclass
class Recipe:
    steps: list[Step] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = "<recipe>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            raise RecipeError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<recipe>") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with the sections {', '.join(SECTIONS)}")
        for key in data:
            if key not in SECTIONS:
                raise RecipeError(f"{source}: {key}: unknown section{did_you_mean(key, SECTIONS)}; allowed: {', '.join(SECTIONS)}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError(f"{source}: steps: expected a non-empty list of steps, got {raw_steps!r}")
        steps = [parse_step(entry, i, source) for i, entry in enumerate(raw_steps)]
        return cls(
            steps=steps,
            calibration=build_config(CalibrationConfig, data.get("calibration"), "calibration", source),
            export=build_config(ExportConfig, data.get("export"), "export", source),
            source=source,
        )

    def to_dict(self) -> dict:
        return {
            "calibration": self.calibration.to_dict(),
            "steps": [{step.name: step.to_dict()} for step in self.steps],
            "export": self.export.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.steps)


def parse_step(entry, index: int, source: str) -> Step:
    where = f"steps[{index}]"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(f"{source}: {where}: a step is a one-key mapping like 'rtn: {{bits: 4}}', got {entry!r}")
    ((name, raw),) = entry.items()
    steps = registered_steps()
    if name not in steps:
        raise RecipeError(
            f"{source}: {where}.{name}: unknown step{did_you_mean(name, steps)}; known steps: {', '.join(steps)}"
        )
    return build_config(steps[name], raw, f"{where}.{name}", source)
